"""Trainer callbacks: progress through the core Progress protocol, metrics.jsonl, and the loss curve.

Preference runs (align) also log TRL's reward accuracy and margin (train batches and held-out pairs):
they go into the same rows and onto a second panel of the curve."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from cnllm.core.errors import CnllmError
from cnllm.core.progress import Progress


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


class TrainingMonitor(TrainerCallback):
    """Reports step, loss, lr and tokens/s to ``progress`` and appends every log to ``metrics.jsonl``.

    Only the main process reports; the other ranks of a distributed run stay silent.
    """

    def __init__(self, progress: Progress, metrics_path: Path):
        self.progress = progress
        self.metrics_path = metrics_path
        self.last_tokens = 0
        self.last_time = time.monotonic()
        self.started = False

    def _write(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_tokens, self.last_time = state.num_input_tokens_seen, time.monotonic()
        if state.is_world_process_zero:
            self.progress.start(state.max_steps, "training", unit="step")
            if state.global_step:
                self.progress.advance(state.global_step)
            self.started = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.started:
            self.progress.advance(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        speed = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_tokens, self.last_time = tokens, now
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round(speed, 1),
            "tokens": tokens,
        }
        if "rewards/accuracies" in logs:
            row["reward_accuracy"], row["reward_margin"] = logs["rewards/accuracies"], logs.get("rewards/margins")
        self._write(row)
        if self.started:
            self.progress.advance(0, loss=float(row["loss"]), lr=float(row["lr"] or 0.0), tok_s=round(speed))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        if "eval_rewards/accuracies" in metrics:
            accuracy, margin = float(metrics["eval_rewards/accuracies"]), float(metrics["eval_rewards/margins"])
            self._write({"step": state.global_step, "eval_loss": loss, "reward_accuracy": accuracy, "reward_margin": margin})
            self.progress.log(f"step {state.global_step}: eval loss {loss:.4f}, reward accuracy {accuracy:.3f}, margin {margin:.4f}")
            return
        self._write({"step": state.global_step, "eval_loss": loss, "perplexity": perplexity(loss)})
        self.progress.log(f"step {state.global_step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.started:
            self.progress.finish()
            self.started = False


class DivergenceError(CnllmError):
    """Training produced a non-finite loss or gradient: what it would save is garbage, so it stops (exit 1)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training stopped at step {step}: {what}; the output was not written. Lower the learning rate "
                         "(align: the beta), or check the data")


class StopOnNonFinite(TrainerCallback):
    """Stops training when the loss or the gradients stop being finite numbers, before the optimizer applies
    them: a NaN loss otherwise trains on (the Trainer hides it from the logged average) and saves a NaN adapter.

    The gradients are checked after clipping (an infinite norm has made them NaN by then), except in fp16 mixed
    precision, whose gradient scaler skips such steps itself; the logged losses (every logging step, and the
    run's mean at the end) are checked always.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        if args.fp16 or model is None:
            return
        finite = [torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None]
        if finite and not bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):  # one sync per step
            raise DivergenceError(state.global_step + 1, "the gradients are not finite (inf or NaN)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "train_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise DivergenceError(state.global_step, f"the loss is {value}")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step``: a resumed run recomputes those steps."""
    if path.exists():
        rows = [r for r in read_metrics(path) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> None:
    """Training loss per step, and eval loss where measured, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    rewards = [(r["step"], r["reward_accuracy"]) for r in rows if "eval_loss" in r and r.get("reward_accuracy") is not None]
    if rewards:
        figure, (axis, reward_axis) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
        margins = [(r["step"], r["reward_margin"]) for r in rows if "eval_loss" in r and r.get("reward_margin") is not None]
        reward_axis.plot(*zip(*rewards), "o-", label="eval reward accuracy", color="tab:green")
        reward_axis.set_ylabel("reward accuracy")
        reward_axis.set_xlabel("step")
        reward_axis.grid(alpha=0.3)
        if margins:
            margin_axis = reward_axis.twinx()
            margin_axis.plot(*zip(*margins), "s--", label="eval reward margin", color="tab:red")
            margin_axis.set_ylabel("reward margin")
            margin_axis.legend(loc="lower right")
        reward_axis.legend(loc="upper left")
    else:
        figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
