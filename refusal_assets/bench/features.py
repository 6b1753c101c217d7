"""Benchmark of the ``features`` asset: its work for every site of a storage root, as the asset
does it (:func:`refusal_assets.features.run.compute_site_features`, then the three files, written
to a scratch folder so the storage is left as it is), timed per site, with rows per second and the
process's peak RSS. The model is loaded once for its weights, as consecutive asset runs in one
process share it. Entry point: ``refusal-assets bench features --json`` (with ``--config``,
``--storage``).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from refusal_assets.config import ProjectConfig
from refusal_assets.features.files import write_site_features
from refusal_assets.features.run import compute_site_features
from refusal_assets.layout import Layout
from refusal_assets.prompts import orbench as data
from refusal_assets.storage import category_key

TARGET_SECONDS = 60.0
"""The issue's budget for the default config's two sites together."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def study_categories(cfg: ProjectConfig) -> list[str]:
    """The categories whose activations train the SAEs (and so feed the cards), as in the graph."""
    if cfg.sae.train_categories is not None:
        return sorted({category_key(c) for c in cfg.sae.train_categories})
    if cfg.data.categories:
        return sorted({category_key(c) for c in cfg.data.categories})
    frame, _ = data.load_orbench(data.data_folder(cfg.data, cfg.resolve), cfg.data.splits)
    return data.category_keys(frame)


def run_features_bench(
    cfg: ProjectConfig,
    storage: Path,
    sites: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Seconds, rows/s and peak RSS of the features work on ``sites`` (default: every site whose
    SAE exists under ``storage``)."""
    layout = Layout(storage)
    categories = study_categories(cfg)
    chosen = sites or [s for s in cfg.site_keys() if layout.sae(s).is_dir()]
    if not chosen:
        raise ValueError(f"no SAE under {storage}: materialize sae (and its activations) first")
    per_site = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="features-bench-") as scratch:
        for site_key in chosen:
            t0 = time.perf_counter()
            result = compute_site_features(cfg, layout, site_key, categories, None, log)
            out = Path(scratch) / site_key
            write_site_features(
                result, out / "top_examples.parquet", out / "latents.parquet", out / "cards.json"
            )
            seconds = time.perf_counter() - t0
            f = result.features
            row = {
                "site": site_key,
                "seconds": round(seconds, 2),
                "scan_seconds": round(result.scan_seconds, 2),
                "lens_seconds": round(result.lens_seconds, 2),
                "rows": f.n_rows + f.n_massive_rows,
                "rows_per_s": round((f.n_rows + f.n_massive_rows) / max(result.scan_seconds, 1e-9)),
                "d_sae": f.d_sae,
                "live_latents": len(f.live),
                "cards_json_mb": round((out / "cards.json").stat().st_size / 2**20, 2),
            }
            log(f"features {site_key}: {row}")
            per_site.append(row)
    total = time.perf_counter() - t_all
    return {
        "bench": "features",
        "config": cfg.name,
        "storage": str(storage),
        "seconds": round(total, 2),
        "rows_per_s": round(sum(r["rows"] for r in per_site) / max(total, 1e-9)),
        "peak_rss_mb": round(_peak_rss_mb()),
        "target_seconds": TARGET_SECONDS,
        "within_target": total <= TARGET_SECONDS,
        "sites": per_site,
    }
