"""Start-up time of `cnllm --help` (target: median ≤ 0.3 s), beside `python -c pass` and a bare typer+rich import.

Run:  .venv/bin/python bench/bench_cli_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import typer, rich.console": [sys.executable, "-c", "import typer, rich.console"],
        "cnllm --help": [sys.executable, "-m", "cnllm", "--help"],
    }
    print("| command | median seconds |\n| --- | --- |")
    for name, command in cases.items():
        print(f"| {name} | {median_seconds(command, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
