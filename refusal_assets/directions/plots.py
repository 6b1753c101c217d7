"""Figures of the execution level: still refusing per category, the layer scan, the steering
trade-off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from refusal_assets.directions.result import ExecutionResult
from refusal_assets.plots import new_figure, save_png


def plot_still_refusing(result: ExecutionResult, path: Path) -> Path:
    """Share of refusing prompts still refusing per category: clean (1 by construction), pooled
    ablated, leave-one-out ablated, random ablated, with 95 % Wilson intervals."""
    cats = [c.category for c in result.categories]
    bars = {
        "clean": [1.0] * len(cats),
        "pooled ablated": [c.pooled_still_refusing for c in result.categories],
        "leave-one-out ablated": [c.loco_still_refusing for c in result.categories],
        "random ablated": [c.random_still_refusing for c in result.categories],
    }
    fig = new_figure((max(5.0, 0.9 * len(cats) + 2), 3.4))
    ax = fig.add_subplot()
    x, width = np.arange(len(cats)), 0.2
    for i, (name, rates) in enumerate(bars.items()):
        if name == "clean":
            ax.bar(x + (i - 1.5) * width, rates, width, label=name, color="#bbbbbb")
            continue
        vals = [r.rate if r.n else 0.0 for r in rates]
        err = np.array(
            [
                [r.rate - r.ci_lo if r.n else 0 for r in rates],
                [r.ci_hi - r.rate if r.n else 0 for r in rates],
            ]
        ).clip(min=0)  # Wilson bounds are clipped to [0, 1]: float error can leave -1e-17
        ax.bar(x + (i - 1.5) * width, vals, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x, cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share still refusing")
    ax.set_title(f"{result.model}: refusal direction ablated (block {result.layer})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_png(fig, path)


def plot_layer_scan(result: ExecutionResult, path: Path) -> Path:
    """Drop of the harmful validation prompts' mean refusal score under ablation, and the harmless
    prompts' KL, by candidate layer (one line per position; filtered-out candidates hollow)."""
    fig = new_figure((5.5, 3.2))
    ax, ax_kl = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    base = result.selection.baseline_score
    for position in sorted({c.position for c in result.selection.candidates}):
        cands = sorted(
            (c for c in result.selection.candidates if c.position == position),
            key=lambda c: c.layer,
        )
        layers = [c.layer for c in cands]
        ax.plot(
            layers,
            [base - c.ablated_score for c in cands],
            marker="o",
            label=f"position {position}",
        )
        ax_kl.plot(layers, [c.kl for c in cands], marker="o", label=f"position {position}")
        bad = [c for c in cands if c.rejected and not math.isnan(c.ablated_score)]
        ax.scatter(
            [c.layer for c in bad],
            [base - c.ablated_score for c in bad],
            s=60,
            facecolors="none",
            edgecolors="red",
            label="filtered out",
        )
    ax.axvline(result.layer, color="gray", ls=":")
    ax.set_xlabel("block input")
    ax.set_ylabel("refusal score drop")
    ax_kl.set_xlabel("block input")
    ax_kl.set_ylabel("KL on harmless")
    ax_kl.set_yscale("log")
    ax.legend(fontsize=6)
    fig.suptitle(f"{result.model}: layer scan (validation)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def plot_steering(result: ExecutionResult, path: Path) -> Path:
    """Toxic refusal rate against over-refusal on safe + hard prompts as the added coefficient
    varies."""
    fig = new_figure((4.5, 3.4))
    ax = fig.add_subplot()
    for curve in result.steering:
        pooled = curve.direction == "pooled"
        ax.plot(
            curve.over_refusal,
            curve.toxic_refusal,
            marker="o",
            lw=2.5 if pooled else 1,
            color="black" if pooled else None,
            alpha=1 if pooled else 0.6,
            label=curve.direction,
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("over-refusal (safe + hard, score > 0)")
    ax.set_ylabel("toxic refusal (score > 0)")
    ax.set_title(
        f"{result.model}: steering trade-off, coefficients "
        + ", ".join(f"{c:g}" for c in (result.steering[0].coefficients if result.steering else [])),
        fontsize=8,
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_png(fig, path)
