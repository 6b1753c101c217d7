"""Plots shared by several stages (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from refusal_assets.storage import atomic_path  # noqa: E402


def plot_sweeps(sweeps: dict[str, dict], title: str, path: Path) -> Path:
    """Faithfulness / completeness against circuit size, one panel per prompt group, random control dashed."""
    fig = Figure(figsize=(4.2 * max(len(sweeps), 1), 3.2))
    axes = fig.subplots(1, max(len(sweeps), 1), squeeze=False)[0]
    for ax, (group, sweep) in zip(axes, sweeps.items()):
        rows = sweep["sweep"]
        n = [r["n_nodes"] for r in rows]
        ax.plot(n, [r["faithfulness"] for r in rows], "o-", label="faithfulness")
        ax.plot(n, [r["completeness"] for r in rows], "s-", label="completeness")
        ax.plot(n, [r["random_faithfulness"] for r in rows], "x--", color="grey", label="random circuit")
        ax.axhline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        ax.set_title(f"{group} prompts", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
