"""Checksum throughput: `cnllm checksum` vs GNU sha256sum, and --jobs scaling.

Run:  .venv/bin/python bench/bench_checksum.py [--size-mib 1024] [--dir /tmp/cnllm-bench]
Measures side by side in one run (these machines are noisy: compare the ratios):
  1. one big file: cnllm (sha256) vs `sha256sum`  — target ≥ 2.5× sha256sum's throughput;
  2. several files: cnllm --jobs 2 vs cnllm --jobs 1 — target ≥ 1.6×.
Files are read once beforehand so both sides hash from the page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CNLLM = [sys.executable, "-m", "cnllm"]


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        for _ in range(size >> 20):
            handle.write(block)


def timed(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cnllm-bench-", dir=args.dir))
    size = args.size_mib << 20
    try:
        big = folder / "big.bin"
        make_file(big, size)
        parts = []
        for i in range(args.files):
            part = folder / "parts" / f"part-{i}.bin"
            part.parent.mkdir(exist_ok=True)
            make_file(part, size // args.files)
            parts.append(part)
        warm([big, *parts])
        gnu = timed(["sha256sum", str(big)], args.repeats)
        ours = timed([*CNLLM, "checksum", "create", str(big)], args.repeats)
        warm(parts)
        one_job = timed([*CNLLM, "checksum", "create", "--jobs", "1", str(folder / "parts")], args.repeats)
        two_jobs = timed([*CNLLM, "checksum", "create", "--jobs", "2", str(folder / "parts")], args.repeats)
        gib = size / (1 << 30)
        print(f"data: {args.size_mib} MiB one file; {args.files} files of {args.size_mib // args.files} MiB; median of {args.repeats}; cpus {os.cpu_count()}")
        print("| case | seconds | GiB/s | ratio |")
        print("| --- | --- | --- | --- |")
        print(f"| sha256sum, one file | {gnu:.2f} | {gib / gnu:.2f} | 1.00 |")
        print(f"| cnllm checksum create, one file | {ours:.2f} | {gib / ours:.2f} | {gnu / ours:.2f}× sha256sum |")
        print(f"| cnllm --jobs 1, {args.files} files | {one_job:.2f} | {gib / one_job:.2f} | 1.00 |")
        print(f"| cnllm --jobs 2, {args.files} files | {two_jobs:.2f} | {gib / two_jobs:.2f} | {one_job / two_jobs:.2f}× --jobs 1 |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
