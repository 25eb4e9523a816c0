"""Figures of evaluation results (matplotlib without a display), written atomically like every cnllm output."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, *, force: bool = False) -> None:
    """``figure`` to ``path`` in the format its suffix names (png, svg, pdf), then closed."""
    from cnllm.core.atomic import atomic_file

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_file(path, force=force) as handle:
        figure.savefig(handle, format=fmt)
    _pyplot().close(figure)


def plot_lines(
    path: Path,
    x: Sequence[int],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    marker_x: int | None = None,
    marker_label: str = "",
    log_y: bool = False,
    force: bool = False,
) -> None:
    """One line per series over ``x`` (a log2 axis: context lengths), with an optional vertical marker."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for label, values in series.items():
        points = [(a, b) for a, b in zip(x, values) if b is not None]
        if points:
            axis.plot(*zip(*points), "o-", label=label)
    if marker_x:
        axis.axvline(marker_x, color="grey", linestyle="--", label=marker_label)
    axis.set_xscale("log", base=2)
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, force=force)


def plot_grid(path: Path, rows: Sequence[str], columns: Sequence[str], values, *, title: str, xlabel: str, ylabel: str, force: bool = False) -> None:
    """A heat map of ``values[row][column]`` in [0, 1] with each cell's value printed (passkey accuracy)."""
    import numpy as np

    plt = _pyplot()
    data = np.asarray(values, dtype=float)
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.2 + 0.5 * len(rows)), dpi=100)
    image = axis.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(columns)), labels=list(columns))
    axis.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(len(rows)):
        for j in range(len(columns)):
            axis.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    save_figure(figure, path, force=force)
