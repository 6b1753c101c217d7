"""The one plotting style: a bare matplotlib ``Figure`` (Agg, no pyplot global state), saved as PNG
through :func:`save_png`, which writes atomically like every other asset file. Every stage's plot
goes through :func:`new_figure` and :func:`save_png`."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from refusal_assets.storage import atomic_path  # noqa: E402


def new_figure(figsize: tuple[float, float], constrained: bool = False) -> Figure:
    """A figure that touches no pyplot state (safe in threads and long-lived processes)."""
    return Figure(figsize=figsize, layout="constrained" if constrained else None)


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as PNG under a temporary name, renamed into place when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def plot_sweeps(sweeps: dict[str, dict], title: str, path: Path) -> Path:
    """Cross-fitted faithfulness / completeness against circuit size, one panel per prompt group,
    bootstrap 95% CIs shaded, the random control dashed."""
    fig = new_figure((4.2 * max(len(sweeps), 1), 3.4))
    axes = fig.subplots(1, max(len(sweeps), 1), squeeze=False)[0]
    for ax, (group, sweep) in zip(axes, sweeps.items()):
        rows = sweep["sweep"]
        n = [r["n_nodes"] for r in rows]
        for key, style, label, color in (
            ("faithfulness", "o-", "faithfulness", "C0"),
            ("completeness", "s-", "completeness", "C1"),
            ("random_faithfulness", "x--", "random circuit", "grey"),
        ):
            ax.plot(n, [r[key] for r in rows], style, color=color, label=label)
            if all(f"{key}_ci" in r for r in rows):
                ax.fill_between(
                    n,
                    [r[f"{key}_ci"][0] for r in rows],
                    [r[f"{key}_ci"][1] for r in rows],
                    color=color,
                    alpha=0.15,
                    lw=0,
                )
        ax.axhline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        # the axis follows the point estimates: a CI whose denominator nears 0 would otherwise flatten every curve
        points = [
            r[k]
            for r in rows
            for k in ("faithfulness", "completeness", "random_faithfulness")
            if math.isfinite(r[k])
        ]
        ax.set_ylim(min(points + [0.0]) - 0.25, max(points + [1.0]) + 0.25)
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        den = sweep["m_full"] - sweep["m_empty"]
        ax.set_title(
            f"{group}: {sweep.get('n_prompts', '?')} prompts, m(M)-m(∅) {den:.2f}", fontsize=9
        )
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def plot_heatmap(
    matrix: np.ndarray,
    labels: list[str],
    title: str,
    path: str | Path,
    annotate_significance: np.ndarray | None = None,
) -> Path:
    """Write a labelled heatmap of ``matrix [n, n]``; cells where ``annotate_significance`` is True get a ``*``."""
    matrix = np.asarray(matrix, dtype=float)
    n = len(labels)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix shape {matrix.shape} does not match {n} labels")
    path = Path(path)
    fig = new_figure((1.2 + 0.8 * n, 1.0 + 0.7 * n), constrained=True)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title(title)
    finite = matrix[np.isfinite(matrix)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n):
        for j in range(n):
            if not np.isfinite(matrix[i, j]):
                continue
            star = "*" if annotate_significance is not None and annotate_significance[i, j] else ""
            colour = "black" if matrix[i, j] > mid else "white"  # readable on both ends of viridis
            ax.text(
                j,
                i,
                f"{matrix[i, j]:.2f}{star}",
                ha="center",
                va="center",
                fontsize=8,
                color=colour,
            )
    return save_png(fig, path, dpi=150)
