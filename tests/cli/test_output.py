import io

from rich.console import Console

from cnllm.cli.output import CliProgress, human_bytes


def test_plain_progress_prints_periodic_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = CliProgress(Console(file=stream, force_terminal=False), interval=0)
    progress.start(4 << 20, "hashing", unit="B")
    progress.advance(1 << 20)
    progress.advance(1 << 20, loss=1.25)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("hashing: 1.0 MiB of 4.0 MiB (25%)")
    assert "loss=1.25" in lines[1]
    assert lines[-1].startswith("hashing: done")


def test_short_task_prints_nothing_in_plain_mode():
    stream = io.StringIO()
    progress = CliProgress(Console(file=stream, force_terminal=False), interval=60)
    progress.start(10, "steps", unit="step")
    progress.advance(10)
    progress.finish()
    assert stream.getvalue() == ""


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"


def test_error_and_warning_lines_print_brackets_as_written(monkeypatch):
    """Messages are text, not Rich markup: SentencePiece's "[check]" and file names like "[a].txt" survive."""
    from cnllm.cli import output

    stream = io.StringIO()
    monkeypatch.setattr(output, "stderr", lambda: Console(file=stream, force_terminal=False, soft_wrap=True))
    output.print_error("failed: trainer_interface.cc(94) [trainer_spec.character_coverage() >= 0.98]")
    output.print_warning("skipped [bold]notes[/].txt")
    assert stream.getvalue().splitlines() == [
        "error: failed: trainer_interface.cc(94) [trainer_spec.character_coverage() >= 0.98]",
        "warning: skipped [bold]notes[/].txt",
    ]


def test_table_values_print_as_written(monkeypatch):
    """A file called "[draft].txt" is a value, not markup; emphasis() is the one way to mark a cell bold."""
    from cnllm.cli import output

    stream = io.StringIO()
    monkeypatch.setattr(output, "stdout", lambda: Console(file=stream, force_terminal=False, soft_wrap=True))
    output.print_table(None, ["file", "ppl"], [["[draft].txt", "1.5"], [output.emphasis("total"), "2.0"]])
    text = stream.getvalue()
    assert "[draft].txt" in text and "total" in text and "[bold]" not in text
