"""Full-weight diffs: recover ``tuned = raw + diff`` and make ``diff = tuned − raw``, tensor by tensor.

Projects that may not redistribute LLaMA publish the difference to it instead. Both directions
stream: the diff (or tuned) checkpoint is read a block of rows at a time, the same rows of the
raw tensor are fetched by name (a raw model with tied embeddings answers for ``lm_head.weight`` with its
input embedding, so a tuned model that untied them diffs and recovers), and the result goes straight to its planned place in an output
shard, so memory holds a few blocks (:data:`BLOCK_BYTES`), never a tensor or a model. Extra
vocabulary rows (an embedding larger than the raw one) are carried by the diff as-is. ``make_diff`` proves, tensor by tensor, that
recovering from the diff it writes reproduces the tuned weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cnllm.core.atomic import atomic_dir, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import WideDType
from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.hashing import VerifyResult, parse_manifest, read_manifest_text, verify_manifest
from cnllm.core.merge import VOCAB_TENSORS, copy_tokenizer, format_shape, layer_count, layout_bytes, output_layout, write_config
from cnllm.core.modelio import (
    EMBEDDING_NAMES,
    LM_HEAD_NAMES,
    TIED_HEAD,
    TiedTensorReader,
    VocabSizes,
    check_vocab_agreement,
    has_tokenizer,
    load_config,
    tokenizer_length,
    with_tied_head,
)
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import finish_output_folder
from cnllm.core.tensors import DEFAULT_SHARD_SIZE, ShardSize, StreamingShardWriter, TensorInfo, TensorReader, tensor_infos

BITS = {"float64": "int64", "float32": "int32", "float16": "int16", "bfloat16": "int16"}
BLOCK_BYTES = 16 << 20  # rows are processed in blocks of about this many fp32 bytes


@dataclass
class TensorDifference:
    name: str
    max_abs_diff: float | None
    reason: str | None = None


@dataclass
class ReferenceReport:
    reference: Path
    tolerance: float
    tensors: list[TensorDifference]

    @property
    def failures(self) -> list[TensorDifference]:
        return [t for t in self.tensors if t.max_abs_diff is None or t.max_abs_diff > self.tolerance]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_diff(self) -> float:
        return max((t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None), default=0.0)


@dataclass
class RecoverOptions:
    """How :func:`recover` writes and checks ``raw + diff``."""

    dtype: Optional[WideDType] = None  # None: the diff's
    max_shard_size: ShardSize = DEFAULT_SHARD_SIZE
    manifest: Optional[Path] = None  # a published checksum list to verify the output against
    reference: Optional[Path] = None  # a reference model to compare every tensor with
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if self.tolerance < 0:
            raise UsageError(f"--tolerance must be at least 0, got {self.tolerance}")
        if self.reference is not None and not self.reference.is_dir():
            raise UsageError(f"--reference {self.reference} is not a model directory")


@dataclass
class MakeDiffOptions:
    """How :func:`make_diff` writes ``tuned − raw`` (fp32 by default: exact for fp16/bf16 models)."""

    dtype: WideDType = WideDType("float32")
    max_shard_size: ShardSize = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        coerce_fields(self)


@dataclass
class DiffResult:
    mode: str
    output: Path
    tensors: int
    extended: list[str]
    dtype: str
    files: list[str]
    total_bytes: int
    read_bytes: int
    seconds: float
    manifest_check: VerifyResult | None = None
    reference_check: ReferenceReport | None = None
    signed_zeros: int = 0
    unwritable: list[str] = field(default_factory=list)  # names the checksum list expects that a recovery never writes
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The one JSON shape of a recovery or a diff: ``--json``, the provenance record and the pipeline report."""
        document = {
            "mode": self.mode,
            "output": str(self.output),
            "dtype": self.dtype,
            "tensors": self.tensors,
            "extended_rows": self.extended,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "read_bytes": self.read_bytes,
            "seconds": round(self.seconds, 3),
            "throughput_bytes_per_s": round(self.throughput),
        }
        if self.mode == "make":
            document["bit_identical_recovery"] = self.signed_zeros == 0
            document["negative_zeros_recovered_as_positive"] = self.signed_zeros
        if self.manifest_check is not None:
            verify = self.manifest_check.to_dict()
            verify["not_written"] = self.unwritable
            document["verify"] = verify
        document["notes"] = self.notes
        if self.reference_check is not None:
            check = self.reference_check
            document["reference"] = {
                "path": str(check.reference),
                "tolerance": check.tolerance,
                "max_abs_diff": check.max_abs_diff,
                "passed": check.passed,
                "failures": [{"tensor": t.name, "max_abs_diff": t.max_abs_diff, "reason": t.reason} for t in check.failures],
            }
        return document

    def problems(self) -> list[str]:
        """Failed checks (the output is complete and in place; the caller decides the exit code)."""
        problems = []
        check = self.reference_check
        if self.manifest_check is not None and not self.manifest_check.passed:
            bad = [c.path for c in self.manifest_check.checks if c.status != "OK"]
            unwritable = [path for path in bad if path in self.unwritable]
            if len(unwritable) < len(bad) or check is None or not check.passed:  # a passed --reference checks what the list cannot
                problem = f"{len(bad)} file(s) do not match {self.manifest_check.manifest} (first: {bad[0]})"
                if unwritable:
                    problem += f"; {len(unwritable)} of them are pickled weight files a recovery never writes (compare tensors with --reference instead)"
                problems.append(problem)
        if check is not None and not check.passed:
            worst = check.failures[0]
            detail = worst.reason or f"max difference {worst.max_abs_diff:.3g}"
            problems.append(f"{len(check.failures)} tensor(s) differ from {check.reference} beyond {check.tolerance:g} (first: {worst.name}: {detail})")
        return [f"{p} (output kept at {self.output})" for p in problems]

    @property
    def throughput(self) -> float:
        """Bytes read plus written per second."""
        return (self.read_bytes + self.total_bytes) / self.seconds if self.seconds else 0.0


# Weight files in pickle formats (and their index): a recovery writes safetensors, so a published list
# naming these can never match, and a pickle's bytes (so its checksum) depend on the torch that saved it.
PICKLED_WEIGHTS = re.compile(r"(?:^|/)(?:pytorch_model[^/]*\.bin|[^/]*\.pth|pytorch_model\.bin\.index\.json|[^/]*\.ckpt)$")


def unwritable_entries(manifest: Path) -> list[str]:
    """Names a checksum list expects that :func:`recover` cannot write (``pytorch_model-*.bin``, ``*.pth`` …)."""
    return [entry.path for entry in parse_manifest(read_manifest_text(manifest)).entries if PICKLED_WEIGHTS.search(entry.path)]


def describe_unwritable(manifest: Path, names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"{manifest} lists {len(names)} file(s) the recovered output will not contain: {shown}. cnllm writes safetensors shards "
        "(model-0000N-of-0000M.safetensors), and the checksum of a pickled .bin/.pth depends on the torch version that saved it, "
        "so these entries cannot match; to check the recovered weights, add --reference DIR (a model recovered by the publisher's "
        "own script) to compare every tensor"
    )


def _raw_infos(base: Path, other: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The raw model's tensors, with its input embedding standing for a tied ``lm_head.weight`` the other model has."""
    infos = tensor_infos(base)
    return with_tied_head(infos) if TIED_HEAD in other else infos


def plan_shapes(raw: dict[str, TensorInfo], other: dict[str, TensorInfo], *, raw_dir: Path, other_dir: Path, other_label: str) -> tuple[dict, list[str]]:
    """Output shapes (those of ``other``) and the tensors that extend the raw vocabulary; errors name the tensor and both shapes."""
    only_raw = [n for n in raw if n not in other]
    only_other = [n for n in other if n not in raw]
    if only_raw or only_other:
        example = f"{only_raw[0]} is missing from the {other_label}" if only_raw else f"{only_other[0]} is missing from the base"
        raise UsageError(
            f"the {other_label} {other_dir} and the base {raw_dir} do not hold the same tensors: {example} "
            f"({len(only_raw) + len(only_other)} tensors differ; base: {len(raw)} tensors, {layer_count(raw)} layers; "
            f"{other_label}: {len(other)} tensors, {layer_count(other)} layers)"
        )
    extended = []
    for name, info in other.items():
        mine, theirs = tuple(raw[name].shape), tuple(info.shape)
        if mine == theirs:
            continue
        if name in VOCAB_TENSORS and len(theirs) == 2 and theirs[1:] == mine[1:] and theirs[0] > mine[0]:
            extended.append(name)
            continue
        raise UsageError(f"shape mismatch for {name}: {format_shape(mine)} in the base {raw_dir}, {format_shape(theirs)} in the {other_label} {other_dir}")
    return {name: tuple(info.shape) for name, info in other.items()}, extended


def _bits(tensor):
    """The tensor's raw bits as integers, so equality means bit-identical (-0.0 and NaN included)."""
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    return tensor.view(getattr(torch, BITS[name])) if name in BITS else tensor


def _blocks(name: str, main: TensorReader, raw: TensorReader):
    """``(first row, block, raw block)`` over about :data:`BLOCK_BYTES` of ``main``'s tensor at a time.

    The raw block holds the same rows of ``raw`` (fewer, or none, past the end of a smaller raw
    vocabulary). A scalar comes whole, with ``first`` ``None``.
    """
    shape = tuple(main.infos[name].shape)
    if not shape:
        yield None, main.get(name), raw.get(name)
        return
    raw_rows = raw.infos[name].shape[0]
    row_elements = 1
    for size in shape[1:]:
        row_elements *= size
    step = max(1, BLOCK_BYTES // max(1, row_elements * 4))
    for first in range(0, shape[0], step):
        stop = min(shape[0], first + step)
        yield first, main.get_rows(name, first, stop), raw.get_rows(name, first, max(first, min(stop, raw_rows)))


def _add_into(target, source, alpha: int = 1) -> None:
    """``target += alpha·source`` in ``target``'s precision (``source`` cast to it first, as in ``raw.to(diff.dtype)``).

    The explicit cast of the (block-sized) source is faster than torch's on-the-fly mixed-dtype add.
    """
    target.add_(source.to(target.dtype), alpha=alpha)


def _dtype_names(layout: list) -> str:
    return ",".join(sorted({str(d).removeprefix("torch.") for _, _, d in layout if d.is_floating_point}))


def _write(writer: StreamingShardWriter, name: str, first: int | None, block) -> None:
    if first is None:
        writer.add(name, block)
    else:
        writer.add_rows(name, first, block)


def _sizes_for(config: dict, shapes: dict, tokenizer_dir: Path | None) -> VocabSizes:
    return VocabSizes(
        tokenizer_length(tokenizer_dir) if tokenizer_dir is not None else None,
        config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"),
        next((shapes[n][0] for n in EMBEDDING_NAMES if n in shapes), None),
        next((shapes[n][0] for n in LM_HEAD_NAMES if n in shapes), None),
    )


def _finish_output(
    tmp: Path, source: Path, config: dict, *, vocab_size: int | None, dtype: str | None, layout: list, kind: str, inputs: list, options: dict, results: dict
) -> tuple[list[str], int]:
    """Config, generation config and tokenizer from ``source``, then the folder finished (record, SHA256SUMS, sizes)."""
    out_dtypes = sorted({str(d).removeprefix("torch.") for _, _, d in layout if d.is_floating_point})
    write_config(config, tmp, vocab_size=vocab_size, dtype=out_dtypes[0] if dtype and len(out_dtypes) == 1 else None)
    if (source / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
    if has_tokenizer(source):
        copy_tokenizer(source, tmp)
    return finish_output_folder(tmp, kind, inputs=inputs, options=options, results=results)


def recover(
    base: Path | str,
    diff: Path | str,
    output: Path | str,
    options: RecoverOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> DiffResult:
    """``tuned = raw + diff`` for every tensor, in the diff's precision unless ``dtype``; config and tokenizer from the diff.

    With ``options.manifest`` the written files are checked against a published checksum list; with
    ``options.reference`` every tensor is compared with a reference model (max absolute difference).
    Both checks run on the complete output; failures are reported in :meth:`DiffResult.problems`
    and the output is kept (published hashes depend on library versions).
    """
    started = time.perf_counter()
    options = options or RecoverOptions()
    options.validate()
    dtype = options.dtype.name if options.dtype is not None else None
    max_shard_size, manifest, reference, tolerance = options.max_shard_size, options.manifest, options.reference, options.tolerance
    base, diff, output = Path(base), Path(diff), Path(output)
    check_output(output, force, inputs=[base, diff, manifest, reference])
    unwritable = unwritable_entries(manifest) if manifest is not None else []
    notes = [describe_unwritable(manifest, unwritable)] if manifest is not None and unwritable else []
    for note in notes:
        progress.log(note)
    config = load_config(diff)
    diff_infos = tensor_infos(diff)
    raw_infos = _raw_infos(base, diff_infos)
    shapes, extended = plan_shapes(raw_infos, diff_infos, raw_dir=base, other_dir=diff, other_label="diff")
    check_vocab_agreement(_sizes_for(config, shapes, diff if has_tokenizer(diff) else None), where=f"diff {diff}")
    layout = output_layout(diff_infos, shapes, dtype)
    out_dtype = {name: d for name, _, d in layout}
    read_bytes = sum(f.stat().st_size for f in {i.file for i in raw_infos.values()} | {i.file for i in diff_infos.values()})
    progress.start(sum(f.stat().st_size for f in {i.file for i in diff_infos.values()}), "recovering", unit="B")
    manifest_check = reference_check = None
    with atomic_dir(output, force=force, needed=layout_bytes(layout)) as tmp:
        writer = StreamingShardWriter(tmp, layout, max_shard_size=max_shard_size)
        with TiedTensorReader(base) as raw, TensorReader(diff) as deltas:
            for name in diff_infos:
                for first, delta, original in _blocks(name, deltas, raw):
                    _add_into(delta[: len(original)] if first is not None else delta, original)
                    _write(writer, name, first, delta.to(out_dtype[name]))
                    progress.advance(delta.numel() * delta.element_size())
        writer.close()
        progress.finish()
        if reference is not None:
            reference_check = compare_with_reference(tmp, Path(reference), tolerance=tolerance, progress=progress)
        if manifest is not None:
            manifest_check = verify_manifest(manifest, root=tmp, progress=progress)
            for check in manifest_check.checks:
                if check.path in unwritable and check.status == "MISSING":
                    check.reason = "not written: a recovery writes safetensors"
        results = {"tensors": len(layout), "extended_rows": extended}
        if manifest_check is not None:
            results["manifest"] = {"path": str(manifest), "passed": manifest_check.passed, "files": {c.path: c.status for c in manifest_check.checks}}
        if reference_check is not None:
            results["reference"] = {"path": str(reference), "max_abs_diff": reference_check.max_abs_diff, "passed": reference_check.passed}
        files, total = _finish_output(
            tmp,
            diff,
            config,
            vocab_size=None,
            dtype=dtype,
            layout=layout,
            kind="diff-recover",
            inputs=[base, diff],
            options=dataclasses.asdict(options),
            results=results,
        )
    dtypes = str(options.dtype) if options.dtype is not None else _dtype_names(layout)
    return DiffResult(
        "recover", output, len(layout), extended, dtypes, files, total, read_bytes, time.perf_counter() - started, manifest_check, reference_check,
        unwritable=unwritable, notes=notes,
    )


def compare_with_reference(model: Path, reference: Path, *, tolerance: float, progress: Progress = NULL_PROGRESS) -> ReferenceReport:
    """Per-tensor max absolute difference (in fp32) between ``model`` and ``reference``, a block of rows at a time."""
    import torch

    checks = []
    progress.start(None, "comparing with the reference", unit="tensor")
    with TensorReader(model) as actual, TensorReader(reference) as expected:
        for name, info in actual.infos.items():
            if name not in expected:
                checks.append(TensorDifference(name, None, "not in the reference"))
                continue
            if tuple(expected.infos[name].shape) != tuple(info.shape):
                checks.append(TensorDifference(name, None, f"shape {format_shape(info.shape)}, the reference {format_shape(expected.infos[name].shape)}"))
                continue
            difference = 0.0
            for _, mine, theirs in _blocks(name, actual, expected):
                if mine.numel():
                    difference = max(difference, (mine.to(torch.float32) - theirs.to(torch.float32)).abs().max().item())
            checks.append(TensorDifference(name, float(difference)))
            progress.advance(1)
        checks += [TensorDifference(n, None, "missing from the output") for n in expected.infos if n not in actual]
    progress.finish()
    return ReferenceReport(reference, tolerance, checks)


def make_diff(
    base: Path | str,
    tuned: Path | str,
    output: Path | str,
    options: MakeDiffOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> DiffResult:
    """``diff = tuned − raw`` (rows beyond the raw vocabulary as-is), checked per tensor to recover ``tuned`` bit for bit.

    The check repeats exactly what :func:`recover` computes; a tensor whose difference cannot
    carry the tuned values exactly in ``options.dtype`` is refused (use a wider dtype). The one
    thing addition cannot restore is the sign of an exact zero (``r + (−r)`` is ``+0.0``): such
    values are counted in ``signed_zeros`` rather than refused.
    """
    started = time.perf_counter()
    options = options or MakeDiffOptions()
    dtype, max_shard_size = options.dtype.name, options.max_shard_size
    base, tuned, output = Path(base), Path(tuned), Path(output)
    check_output(output, force, inputs=[base, tuned])
    config = load_config(tuned)
    tuned_infos = tensor_infos(tuned)
    raw_infos = _raw_infos(base, tuned_infos)
    shapes, extended = plan_shapes(raw_infos, tuned_infos, raw_dir=base, other_dir=tuned, other_label="tuned model")
    layout = output_layout(tuned_infos, shapes, dtype)
    out_dtype = {name: d for name, _, d in layout}
    read_bytes = sum(f.stat().st_size for f in {i.file for i in raw_infos.values()} | {i.file for i in tuned_infos.values()})
    progress.start(sum(f.stat().st_size for f in {i.file for i in tuned_infos.values()}), "making the diff", unit="B")
    signed_zeros = 0
    with atomic_dir(output, force=force, needed=layout_bytes(layout)) as tmp:
        writer = StreamingShardWriter(tmp, layout, max_shard_size=max_shard_size)
        with TiedTensorReader(base) as raw, TensorReader(tuned) as tuned_reader:
            for name in tuned_infos:
                for first, value, original in _blocks(name, tuned_reader, raw):
                    progress.advance(value.numel() * value.element_size())
                    delta = value.to(out_dtype[name], copy=True)
                    shared = delta[: len(original)] if first is not None else delta
                    _add_into(shared, original, alpha=-1)
                    recovered = delta.clone()
                    _add_into(recovered[: len(original)] if first is not None else recovered, original)
                    recovered = recovered.to(value.dtype)
                    differ = _bits(recovered) != _bits(value)
                    if not differ.any():
                        _write(writer, name, first, delta)
                        continue
                    zeros = (recovered == 0) & (value == 0)
                    signed_zeros += int((differ & zeros).sum())
                    differing = int((differ & ~zeros).sum())
                    if differing:
                        raise CheckFailed(
                            f"{name}: {differing} values cannot be recovered bit for bit from a {out_dtype[name]} difference "
                            "(pass a wider --dtype, e.g. fp32 or fp64)"
                        )
                    _write(writer, name, first, delta)
        writer.close()
        progress.finish()
        files, total = _finish_output(
            tmp,
            tuned,
            config,
            vocab_size=None,
            dtype=None,
            layout=layout,
            kind="make-diff",
            inputs=[base, tuned],
            options=dataclasses.asdict(options),
            results={
                "tensors": len(layout),
                "extended_rows": extended,
                "bit_identical_recovery": signed_zeros == 0,
                "negative_zeros_recovered_as_positive": signed_zeros,
            },
        )
    return DiffResult("make", output, len(layout), extended, str(options.dtype), files, total, read_bytes, time.perf_counter() - started, signed_zeros=signed_zeros)
