import subprocess
import sys
import textwrap

import pytest

from cnllm.cli.app import COMMANDS, load_command


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_listed_help_matches_the_command_itself(name):
    command = load_command(name)
    assert command.name == name
    assert command.get_short_help_str(limit=500) == COMMANDS[name][2]


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cnllm ")


def test_unknown_command_is_one_line_usage_error(cli):
    result = cli("frobnicate")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "frobnicate" in lines[0]


def test_bad_option_value_is_exit_2(cli, tmp_path):
    result = cli("checksum", "create", tmp_path, "--algo", "crc32")
    assert result.exit_code == 2 and "crc32" in result.stderr


def test_group_without_subcommand_shows_help_and_exits_2(cli):
    result = cli("checksum")
    assert result.exit_code == 2 and "create" in result.stdout + result.stderr
    assert result.stdout.count("Usage:") + result.stderr.count("Usage:") == 1


def test_debug_shows_traceback_only_when_asked(cli, tmp_path):
    plain = cli("checksum", "verify", tmp_path / "missing")
    assert plain.exit_code == 2 and "Traceback" not in plain.stderr
    debug = cli("--debug", "checksum", "verify", tmp_path / "missing")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


def test_unexpected_exception_is_exit_1_with_hint(cli, tmp_path, monkeypatch):
    from cnllm.core import hashing

    def boom(*args, **kwargs):
        raise ValueError("kaboom")

    monkeypatch.setattr(hashing, "create_manifest", boom)
    (tmp_path / "f").write_text("x")
    result = cli("checksum", "create", tmp_path / "f")
    assert result.exit_code == 1 and "kaboom" in result.stderr and "--debug" in result.stderr


def test_building_the_app_and_checksum_do_not_import_torch(tmp_path):
    (tmp_path / "f.txt").write_text("data")
    script = textwrap.dedent(
        f"""
        import sys
        from cnllm.cli.app import main
        for argv in (["--help"], ["checksum", "create", {str(tmp_path)!r}, "-o", {str(tmp_path / 'SUMS')!r}],
                     ["checksum", "verify", {str(tmp_path / 'SUMS')!r}, "--json"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        heavy = [m for m in ("torch", "transformers", "peft", "llama_cpp", "datasets", "fastapi") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_console_script_entry_point_runs():
    completed = subprocess.run([sys.executable, "-m", "cnllm", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("cnllm")


def test_no_command_module_imports_heavy_libraries_at_import_time():
    script = textwrap.dedent(
        """
        import importlib, sys
        from cnllm.cli.app import COMMANDS
        for module, _, _ in COMMANDS.values():
            importlib.import_module(module)
        heavy = [m for m in ("torch", "transformers", "peft", "llama_cpp", "datasets", "fastapi", "gguf") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def _options(command, path):
    import click

    for param in command.params:
        if isinstance(param, click.Option):
            yield path, param
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _options(command.get_command(ctx, name), f"{path} {name}")


def test_short_aliases_have_one_meaning_across_commands():
    import typer

    from cnllm.cli.app import app
    from cnllm.cli.options import SHORT_OPTIONS

    root = typer.main.get_command(app)
    ctx = typer.main.get_command(app).make_context("cnllm", [], resilient_parsing=True)
    seen = {}
    for name in COMMANDS:
        for where, param in _options(root.get_command(ctx, name), f"cnllm {name}"):
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if len(o) == 2):
                assert short in SHORT_OPTIONS, f"{where}: {short} is not in the alias table"
                assert longs[0] in SHORT_OPTIONS[short][0], f"{where}: {short} means {longs[0]}, the table says {SHORT_OPTIONS[short][0]}"
                seen.setdefault(short, set()).add(longs[0])
    assert set(seen) == set(SHORT_OPTIONS) - {"-h"}  # no stale rows
    assert seen["-t"] == {"--temperature"} and seen["-o"] == {"--output", "--workdir"}


def test_pipeline_and_demo_name_the_work_directory_alike(cli):
    for command in ("pipeline", "demo"):
        assert "--workdir" in cli(command, "--help").stdout


# A command whose work happens in C code that calls back into Python (as llama.cpp's quantizer logs through
# a ctypes callback): SIGTERM arrives inside the callback, where Python swallows the exception it raises.
SIGTERM_IN_C_CALLBACK = """
import ctypes, ctypes.util, os, signal, sys
import click
from cnllm.cli import errors

@click.command()
def sort():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    sent = []

    def by_value(a, b):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        for _ in range(200):
            pass
        return a[0] - b[0]

    values = (ctypes.c_int * 5000)(*range(5000, 0, -1))
    libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), compare(by_value))
    import time
    time.sleep(30)  # never reached: the signal is delivered again once qsort returns
    print("finished")

sys.exit(errors.run(sort, [], debug=lambda: False))
"""


def test_sigterm_swallowed_by_a_c_callback_still_terminates_with_143():
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_C_CALLBACK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "error: terminated" and "finished" not in done.stdout
