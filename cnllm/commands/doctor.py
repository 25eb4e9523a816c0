"""``cnllm doctor``: versions, the CPU, llama.cpp's build, and the settings cnllm will use on this machine."""

from __future__ import annotations

from cnllm.cli import output
from cnllm.cli.options import JsonOpt, RepackOpt, ThreadsOpt
from cnllm.core.errors import CheckFailed


def doctor(repack: RepackOpt = None, threads: ThreadsOpt = None, json_: JsonOpt = False) -> None:
    """Show library versions, the CPU and its features, llama.cpp's build, and what cnllm will use (repacking, threads, backends).

    It loads no model. Exit 1 when something will fail (llama-cpp-python missing, or repacking that cannot be turned
    off on a CPU that needs it off). --repack / --no-repack / --threads show what chat, serve and eval would use with them.

    Example: cnllm doctor
    Example: cnllm doctor --json
    """
    from cnllm.core.doctor import diagnose

    report = diagnose(repack=repack, threads=threads)
    document = report.to_dict()
    if json_:
        output.print_json(document)
    else:
        _render(report)
    if report.problems:
        raise CheckFailed(report.problems[0] if len(report.problems) == 1 else f"{len(report.problems)} problems: " + "; ".join(report.problems))


def _render(report) -> None:
    versions = report.versions
    rows = [("cnllm", versions["cnllm"]), ("python", report.python), ("platform", report.platform)]
    rows += [(name, version or "not installed") for name, version in versions.items() if name != "cnllm"]
    output.print_table("versions", ["package", "version"], rows)
    cpu, llama = report.cpu, report.llama_cpp
    output.print_table(
        "CPU",
        ["", "value"],
        [
            ("model", cpu.model),
            ("machine", f"{cpu.machine}, {cpu.cores} logical CPUs"),
            ("flags for llama.cpp", " ".join(cpu.llama_flags) or "(none reported)"),
            ("AMX", ", ".join(cpu.amx) or "no"),
        ],
    )
    if llama.importable:
        rows = [
            ("llama-cpp-python", f"{llama.version} (cnllm is tested with 0.3.36)" if llama.version != "0.3.36" else llama.version),
            ("system info", llama.system_info),
            ("backends", ", ".join(llama.backends) or "?"),
            ("GPU offload", "yes" if llama.gpu_offload else "no"),
            ("AMX kernels built", "yes" if llama.amx_build else "no"),
            ("repack switch (use_extra_bufts)", "yes" if llama.repack_field else "no: llama.cpp's default always"),
        ]
    else:
        rows = [("llama-cpp-python", f"cannot be imported: {llama.error}")]
    output.print_table("llama.cpp", ["", "value"], rows)
    will = report.to_dict()["will_use"]
    if report.repack is not None:
        state = {True: "on", False: "off", None: "?"}[report.repack_in_effect]
        source = {"option": "option", "environment": "environment", "cpu": "automatic"}[report.repack.source]
        repack_row = f"{state} ({source}: {report.repack.reason})"
    else:
        repack_row = f"? ({report.repack_error})"
    threads = will["threads"]
    output.print_table(
        "cnllm will use",
        ["", "value"],
        [
            ("llama.cpp weight repacking", repack_row),
            ("llama.cpp threads", f"{threads['decode']} decoding, {threads['batch']} prompt batches (--threads N sets both)"),
            ("GGUF files", "llama.cpp on " + (", ".join(llama.backends) or "?") + (" (--gpu-layers offloads)" if llama.gpu_offload else "")),
            ("Hugging Face folders", "transformers on " + (", ".join(report.torch_devices) or "? (torch cannot be imported)")),
        ],
    )
    for message in report.warnings:
        output.print_warning(message)
