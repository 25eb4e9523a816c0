"""``cnllm demo``: the whole pipeline on a tiny model built on the fly, on the bundled samples.

Builds a 2-layer LLaMA with a SentencePiece tokenizer trained on English (the "base LLaMA"),
then runs the recipe ``cnllm/assets/demo-recipe.yaml``: Chinese vocabulary, continued
pre-training, merge, instruction tuning, merge, preference alignment (DPO), merge, GGUF,
quantization, evaluation, checksums — and asks the final model one question through the
generation core.

``--base smollm2`` runs the same adaptation on a real trained model instead, SmolLM2-135M-Instruct
(fetched once, :mod:`cnllm.core.smollm2`), with ``cnllm/assets/demo-smollm2-recipe.yaml``: ChatML
instruction tuning, no alignment, sized for 2 CPU cores; the report adds the base model's answer.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from cnllm.core.atomic import atomic_dir
from cnllm.core.errors import UsageError
from cnllm.core.pipeline import PipelineResult, recipe_from_dict, run_pipeline
from cnllm.core.pipeline_types import Recipe
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.tiny import ASSETS, build_spm_tokenizer, build_tiny_llama

DEMO_RECIPE = ASSETS / "demo-recipe.yaml"
DEMO_BASES = ("tiny", "smollm2")
DEMO_RECIPES = {"tiny": DEMO_RECIPE, "smollm2": ASSETS / "demo-smollm2-recipe.yaml"}
DEMO_QUESTION = "请用一句话介绍一下秋天。"


@dataclass
class DemoResult:
    pipeline: PipelineResult
    question: str
    answer: str | None
    answer_before: str | None = None


def build_demo_base(folder: Path, progress: Progress = NULL_PROGRESS) -> Path:
    """The demo's "base LLaMA": English-only tokenizer, random 2-layer model (built once, atomically)."""
    model = folder / "model"
    if not (model / "config.json").exists():
        progress.log(f"demo: building the tiny base model in {folder}")
        with atomic_dir(folder, force=True) as temporary:
            tokenizer = build_spm_tokenizer(temporary / "tokenizer")
            build_tiny_llama(temporary / "model", tokenizer, hidden_size=128, intermediate_size=256, layers=2, heads=4, kv_heads=2)
    return model


def ask(model: Path, question: str) -> str:
    """One answer from the instruction (or aligned) model, through the same generation core as `cnllm chat`, in the
    template sft recorded in the model (``--template auto``)."""
    from cnllm.core.backends import load_model
    from cnllm.core.generation.base import SamplingParams

    with load_model(model) as generator:
        prompt_format = generator.prompt_format("auto")
        prompt = prompt_format.render([{"role": "user", "content": question}], None)
        # A fixed seed keeps the answer reproducible; greedy decoding makes a model this small repeat one token.
        params = SamplingParams(max_tokens=48, temperature=0.7, top_p=0.9, seed=0, repetition_penalty=1.1, stop=prompt_format.stop)
        return generator.complete(prompt, params).text


def demo_base(base: str, workdir: Path, progress: Progress = NULL_PROGRESS) -> Path:
    """The base model of the demo named ``base``: the tiny one built in ``workdir``, or the real one, fetched once."""
    if base not in DEMO_BASES:
        raise UsageError(f"unknown demo base {base!r}; choose one of: {', '.join(DEMO_BASES)}")
    if base == "smollm2":
        from cnllm.core.smollm2 import smollm2_hf

        return smollm2_hf(progress=progress)
    return build_demo_base(workdir / "00-base", progress)


def demo_recipe(base: str, base_model: Path, workdir: Path) -> Recipe:
    """The embedded recipe of the demo named ``base``, on ``base_model``."""
    from cnllm.core.config import load_yaml

    source = DEMO_RECIPES[base]
    data = load_yaml(source)
    data["base"] = {"model": str(base_model)}
    return recipe_from_dict(data, root=ASSETS, workdir=Path(workdir).absolute(), source=source)


def run_demo(workdir: Path, *, base: str = "tiny", force: bool = False, progress: Progress = NULL_PROGRESS) -> DemoResult:
    """Obtain the base, run its demo recipe, ask the final model one question (and, on a real base that can
    already answer, the base model too); the answers join the report."""
    from cnllm.core.pipeline import write_report

    workdir = Path(workdir).absolute()
    recipe = demo_recipe(base, demo_base(base, workdir, progress), workdir)
    result = run_pipeline(recipe, force=force, progress=progress)
    answer = answer_before = None
    if result.failed is None:
        models = result.artifacts.models
        model = models.get("align", models.get("sft", result.artifacts.model))
        answer = ask(model, DEMO_QUESTION)
        result.notes["chat"] = {"model": str(model), "question": DEMO_QUESTION, "answer": answer}
        if base != "tiny":
            answer_before = ask(recipe.base_model, DEMO_QUESTION)
            result.notes["chat"]["answer_before"] = answer_before
        result.report_md, result.report_json = write_report(result)
    return DemoResult(result, DEMO_QUESTION, answer, answer_before)


def next_commands(result: PipelineResult) -> list[tuple[str, str]]:
    """What to try next on the demo's own outputs: (what it does, command), paths relative to the current folder.

    No ``--template``: the chat template sft recorded travels with the model into its GGUF files.
    """

    def shown(path: Path) -> str:
        try:
            return shlex.quote(str(path.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(path))

    commands = []
    quantized = result.artifacts.gguf.get("q4_k_m") or next(iter(result.artifacts.gguf.values()), None)
    if quantized is not None:
        commands.append(("chat with the 4-bit model", f"cnllm chat {shown(quantized)}"))
        commands.append(("serve it to OpenAI clients", f"cnllm serve {shown(quantized)} --port 8000"))
    if result.report_md is not None:
        commands.append(("read the report", f"less {shown(result.report_md)}"))
    return commands
