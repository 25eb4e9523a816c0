"""Checksum throughput: `cnllm checksum` vs GNU sha256sum, and --jobs scaling.

Run:  .venv/bin/python bench/bench_checksum.py [--size-mib 1024] [--manifest-files 100000] [--dir /tmp/cnllm-bench]
Measures side by side in one run (these machines are noisy: compare the ratios):
  1. one big file: cnllm (sha256) vs `sha256sum`  — target ≥ 2.5× sha256sum's throughput;
  2. several files: cnllm --jobs 2 vs cnllm --jobs 1 — target ≥ 1.6×;
  3. a manifest of many small files: `cnllm checksum verify` (summary and failures), with --json and with
     --all (the full table) vs `sha256sum -c --quiet`.
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


def timed(command: list[str], repeats: int, cwd: Path | None = None) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
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
    parser.add_argument("--manifest-files", type=int, default=100_000)
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
        many = folder / "many"
        many.mkdir()
        for number in range(args.manifest_files):
            (many / f"f{number:06d}.txt").write_bytes(f"file {number}\n".encode())
        manifest = many / "SHA256SUMS"
        listing = subprocess.run(["sha256sum", *sorted(p.name for p in many.iterdir())], cwd=many, check=True, capture_output=True)
        manifest.write_bytes(listing.stdout)
        gnu_check = timed(["sha256sum", "-c", "--quiet", "SHA256SUMS"], args.repeats, cwd=many)
        verify = timed([*CNLLM, "checksum", "verify", str(manifest)], args.repeats)
        verify_json = timed([*CNLLM, "checksum", "verify", str(manifest), "--json"], args.repeats)
        verify_all = timed([*CNLLM, "checksum", "verify", str(manifest), "--all"], 1)
        print(f"| sha256sum -c --quiet, {args.manifest_files} small files | {gnu_check:.2f} | | 1.00 |")
        print(f"| cnllm checksum verify (summary + failures) | {verify:.2f} | | {verify / gnu_check:.1f}× sha256sum's time |")
        print(f"| cnllm checksum verify --json | {verify_json:.2f} | | {verify_json / gnu_check:.1f}× |")
        print(f"| cnllm checksum verify --all (full table, one run) | {verify_all:.2f} | | {verify_all / gnu_check:.1f}× |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
