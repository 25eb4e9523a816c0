from cnllm.cli import reference
from cnllm.cli.app import COMMANDS, load_command


def test_committed_reference_is_current():
    assert reference.main(["--check"]) == 0, "regenerate with: python -m cnllm.cli.reference"


def test_reference_documents_every_command_and_option():
    text = reference.reference()
    for name in COMMANDS:
        command = load_command(name)
        assert f"## `cnllm {name}`" in text
        for param in command.params:
            if getattr(param, "opts", None) and param.opts[0].startswith("--"):
                assert f"`{param.opts[0]}`" in text, (name, param.opts[0])


def test_stale_reference_is_detected(tmp_path):
    target = tmp_path / "ref.md"
    target.write_text("old\n")
    assert reference.main(["--check", str(target)]) == 1
    assert reference.main([str(target)]) == 0 and reference.main(["--check", str(target)]) == 0
