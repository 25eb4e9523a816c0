"""Generate the shell completion scripts kept in ``completions/``.

Regenerate:  python -m cnllm.cli.completions          (writes completions/)
Check:       python -m cnllm.cli.completions --check  (exit 1 when a file is stale)
The scripts call back into ``cnllm`` at completion time, the same as ``cnllm --install-completion``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "cnllm.bash", "zsh": "_cnllm", "fish": "cnllm.fish"}
COMPLETE_VAR = "_CNLLM_COMPLETE"


def scripts() -> dict[str, str]:
    from typer._completion_shared import get_completion_script

    return {
        filename: get_completion_script(prog_name="cnllm", complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"
        for shell, filename in SHELLS.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    folder = Path(next((a for a in args if not a.startswith("--")), Path(__file__).resolve().parents[2] / "completions"))
    stale = []
    for filename, text in scripts().items():
        target = folder / filename
        if check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(str(target))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if stale:
        print("stale completion scripts (run: python -m cnllm.cli.completions): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
