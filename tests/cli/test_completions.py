import os
import subprocess
import sys

from cnllm.cli import completions


def test_committed_completions_are_current():
    assert completions.main(["--check"]) == 0, "regenerate with: python -m cnllm.cli.completions"


def test_stale_completion_is_detected(tmp_path):
    completions.main([str(tmp_path)])
    (tmp_path / "cnllm.bash").write_text("# stale\n")
    assert completions.main(["--check", str(tmp_path)]) == 1


def test_show_completion_and_completion_requests_work():
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run([sys.executable, "-m", "cnllm", "--show-completion", "bash"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "_CNLLM_COMPLETE" in shown.stdout
    request = {**os.environ, "_CNLLM_COMPLETE": "complete_bash", "COMP_WORDS": "cnllm check", "COMP_CWORD": "1"}
    completed = subprocess.run([sys.executable, "-m", "cnllm"], capture_output=True, text=True, env=request)
    assert "checksum" in completed.stdout
