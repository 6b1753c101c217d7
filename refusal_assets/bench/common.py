"""What the benchmarks share: the config, the prompt sample they all run on, the device and
its timer sync."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from refusal_assets.config import ProjectConfig, load_config

SAMPLE_SEED = 0


def project_config(config_path: str | None) -> ProjectConfig:
    """The config at ``config_path``, or the project's (``$REFUSAL_ASSETS_CONFIG``, see
    :func:`refusal_assets.app.settings.load_project`)."""
    if config_path:
        return load_config(config_path)
    from refusal_assets.app.settings import load_project

    return load_project()


def bench_sample(cfg: ProjectConfig, n_prompts: int) -> pl.DataFrame:
    """The first ``n_prompts`` of the embedded sample in a fixed seeded order (wrapping around if short),
    then ordered by prompt length, so that all three ways run the very same batches (the collector
    may itself sort by length to pad less; on sorted input that is a no-op)."""
    from refusal_assets.prompts.orbench import load_orbench

    folder = cfg.root / "data" / "orbench_sample"
    if not folder.is_dir():  # a config outside this project: the sample shipped beside the package
        folder = Path(__file__).resolve().parents[2] / "data" / "orbench_sample"
    df, _ = load_orbench(folder)
    order = np.random.default_rng(SAMPLE_SEED).permutation(df.height)
    idx = [int(order[i % df.height]) for i in range(n_prompts)]
    prompts = df["prompt"].to_list()
    idx.sort(key=lambda i: (len(prompts[i]), prompts[i]))
    return (
        df[idx].select("prompt_id", "prompt", "split").with_columns(pl.lit(False).alias("heldout"))
    )


def bench_device() -> str:
    """The device a benchmark runs on: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync_device(device: str) -> None:
    """Wait for the device's queued work, so a timer read after it covers that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
