"""OR-Bench prompts: loading a folder in OR-Bench layout (or the hub dataset), sampling, profiling.

Documented handling of messy input:
- a file that is missing, empty, not UTF-8, binary, badly quoted, or lacks the ``prompt`` /
  ``category`` columns is an error naming the file (and line);
- rows with an empty prompt are dropped and counted (``n_dropped_empty``); an empty category is an error;
- the same prompt twice in one split is kept once (``n_dropped_duplicate``); a prompt in both
  ``or-bench-80k`` and ``or-bench-hard-1k`` (the real OR-Bench's hard set is drawn from the 80k
  set) is kept in the more specific split, ``hard``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from refusal_assets.config import SPLIT_FILES, DataConfig, SAECorpusConfig, SamplingConfig
from refusal_assets.storage import category_key

SPLIT_ORDER = ["safe", "hard", "toxic"]
PROMPT_SCHEMA = {
    "prompt_id": pl.Utf8,
    "prompt": pl.Utf8,
    "category": pl.Utf8,
    "category_key": pl.Utf8,
    "split": pl.Utf8,
}


class DataError(ValueError):
    """Input data is unusable; the message names the file, line or category."""


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    n_dropped_empty: int = 0
    n_dropped_duplicate: int = 0


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.strip().encode("utf-8")).hexdigest()[:16]


def _csv_text(path: Path) -> str:
    """The text of a CSV file, or a DataError naming the file: empty, binary or not UTF-8."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    if b"\x00" in raw:
        raise DataError(f"{path}: binary data (NUL bytes), not a CSV file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 at line {line} (byte {e.start}); re-save the file as UTF-8"
        ) from e


def _read_split_csv(path: Path, split: str) -> tuple[list[dict[str, str]], int]:
    text = _csv_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise DataError(f"{path}: repeated column(s) {dupes} in the header {columns}")
    missing = [c for c in ("prompt", "category") if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {columns} (expected at least prompt,category)"
        )
    reader.fieldnames = columns
    rows: list[dict[str, str]] = []
    n_empty = 0
    try:
        for row in reader:
            if None in row:  # more fields than the header: a quoting problem
                raise DataError(
                    f"{path}: line {reader.line_num}: more fields than the header; check the quoting"
                )
            prompt = (row.get("prompt") or "").strip()
            category = (row.get("category") or "").strip()
            if not prompt:
                n_empty += 1
                continue
            if not category:
                raise DataError(
                    f"{path}: line {reader.line_num}: empty category for prompt {prompt[:60]!r}"
                )
            try:
                category_key(category)
            except ValueError as e:
                raise DataError(f"{path}: line {reader.line_num}: {e}") from None
            rows.append({"prompt": prompt, "category": category, "split": split})
    except csv.Error as e:
        # line_num counts the lines consumed so far; the broken record starts on the next one
        raise DataError(f"{path}: line {reader.line_num + 1}: malformed CSV ({e})") from e
    if not rows:
        raise DataError(f"{path}: no prompts (every row is empty)")
    return rows, n_empty


def corpus_files(cfg: SAECorpusConfig, resolve) -> list[Path]:
    """The CSV files of ``sae.corpus.path`` (the file itself, or every ``*.csv`` of the folder, sorted)."""
    path = Path(resolve(cfg.path))
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DataError(f"key 'sae.corpus.path': folder {path} holds no *.csv file")
        return files
    if not path.is_file():
        raise DataError(
            f"key 'sae.corpus.path': {path} does not exist (a CSV file with a 'prompt' column, or a folder of them)"
        )
    return [path]


def corpus_fingerprint(cfg: SAECorpusConfig, resolve) -> str:
    """A short hash of the corpus files' names and bytes: editing the corpus changes it."""
    digest = hashlib.sha256()
    for f in corpus_files(cfg, resolve):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def load_corpus(cfg: SAECorpusConfig, resolve) -> pl.DataFrame:
    """The SAE training corpus: ``prompt_id, prompt, split ("corpus"), heldout (false)``, one row per
    distinct prompt, in a seeded order (``max_prompts`` keeps the first ones of it)."""
    texts: list[str] = []
    for f in corpus_files(cfg, resolve):
        reader = csv.DictReader(io.StringIO(_csv_text(f), newline=""), strict=True)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "prompt" not in columns:
            raise DataError(
                f"{f}: no 'prompt' column in the header {columns} (key 'sae.corpus.path')"
            )
        reader.fieldnames = columns
        try:
            texts += [(row.get("prompt") or "").strip() for row in reader]
        except csv.Error as e:
            raise DataError(f"{f}: line {reader.line_num + 1}: malformed CSV ({e})") from e
    texts = sorted({t for t in texts if t})
    if not texts:
        raise DataError(
            f"key 'sae.corpus.path': {cfg.path} holds no prompt (every 'prompt' cell is empty)"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(texts))[: cfg.max_prompts]
    chosen = [texts[i] for i in order]
    return pl.DataFrame(
        {
            "prompt_id": [prompt_id(t) for t in chosen],
            "prompt": chosen,
            "split": ["corpus"] * len(chosen),
            "heldout": [False] * len(chosen),
        },
        schema={"prompt_id": pl.Utf8, "prompt": pl.Utf8, "split": pl.Utf8, "heldout": pl.Boolean},
    )


def fetch_from_hub(cfg: DataConfig, cache_dir: Path, splits: Sequence[str]) -> Path:
    """Download the OR-Bench split files into ``cache_dir`` (once) and return that folder."""
    wanted = [SPLIT_FILES[s] for s in splits]
    if all((cache_dir / f).is_file() for f in wanted):
        return cache_dir
    try:
        from huggingface_hub import hf_hub_download

        for filename in wanted:
            hf_hub_download(cfg.hub_dataset, filename, repo_type="dataset", local_dir=cache_dir)
    except Exception as e:  # network, auth, missing file: all end the same way for the user
        raise DataError(
            f"cannot fetch {wanted} from the hub dataset {cfg.hub_dataset!r} into {cache_dir} "
            f"({type(e).__name__}: {e}). "
            "Without network access, download the CSV files elsewhere and pass --data-dir FOLDER."
        ) from e
    return cache_dir


def load_orbench(
    folder: Path, splits: Sequence[str] = SPLIT_ORDER, categories: Sequence[str] | None = None
) -> tuple[pl.DataFrame, LoadReport]:
    """Read the split files of an OR-Bench-layout folder into one frame.

    Columns: ``prompt_id, prompt, category, category_key, split``. At least one requested split
    file must exist; the ones that do not are skipped (OR-Bench derivatives ship a subset).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    report = LoadReport()
    rows: list[dict[str, str]] = []
    for split in splits:
        path = folder / SPLIT_FILES[split]
        if not path.is_file():
            continue
        split_rows, n_empty = _read_split_csv(path, split)
        report.files.append(str(path))
        report.n_dropped_empty += n_empty
        rows.extend(split_rows)
    if not report.files:
        expected = [SPLIT_FILES[s] for s in splits]
        found = sorted(p.name for p in folder.iterdir())[:20]
        raise DataError(f"{folder}: none of the split files {expected} exist (found: {found})")
    df = pl.DataFrame(rows, schema={"prompt": pl.Utf8, "category": pl.Utf8, "split": pl.Utf8})
    df = df.with_columns(
        pl.col("prompt").map_elements(prompt_id, return_dtype=pl.Utf8).alias("prompt_id"),
        pl.col("category").map_elements(category_key, return_dtype=pl.Utf8).alias("category_key"),
        pl.col("split")
        .replace_strict({s: i for i, s in enumerate(SPLIT_ORDER)}, return_dtype=pl.Int8)
        .alias("_rank"),
    )
    n_before = df.height
    # The most specific split wins (hard beats safe); then one row per prompt.
    df = df.sort(["_rank"], descending=True, maintain_order=True).unique(
        "prompt_id", keep="first", maintain_order=True
    )
    report.n_dropped_duplicate = n_before - df.height
    if categories is not None:
        wanted = {category_key(c) for c in categories}
        unknown = sorted(wanted - set(df["category_key"].unique()))
        if unknown:
            raise DataError(
                f"{folder}: categories {unknown} from the data config have no prompts in the data"
            )
        df = df.filter(pl.col("category_key").is_in(wanted))
    df = df.sort(["category_key", "_rank", "prompt_id"]).drop("_rank")
    return df.select(list(PROMPT_SCHEMA)), report


def data_folder(cfg: DataConfig, resolve) -> Path:
    """The local folder holding the split files: the configured folder, or the hub cache."""
    if cfg.source == "local":
        return resolve(cfg.path)
    return fetch_from_hub(cfg, resolve(cfg.cache_dir), cfg.splits)


def category_keys(df: pl.DataFrame) -> list[str]:
    keys = sorted(df["category_key"].unique().to_list())
    if not keys:
        raise DataError("the data holds no categories")
    return keys


def _category_seed(seed: int, category: str) -> int:
    # Per-category seed: adding a category never changes another category's sample.
    return (seed * 1_000_003 + zlib.crc32(category.encode())) % 2**32


def sample_category(
    df: pl.DataFrame, category: str, sampling: SamplingConfig, seed: int, heldout_fraction: float
) -> pl.DataFrame:
    """The seeded sample of one category with a ``heldout`` flag, split by split.

    ``equalize`` takes the same number of prompts from each split of the category (the smallest
    split's size, capped by ``max_per_cell``); ``use_all`` takes everything (capped likewise).
    """
    cat = df.filter(pl.col("category_key") == category)
    if cat.height == 0:
        raise DataError(f"category {category!r} has no prompts")
    rng = np.random.default_rng(_category_seed(seed, category))
    sizes = cat.group_by("split").len()
    per_split = dict(zip(sizes["split"].to_list(), sizes["len"].to_list()))
    n_equal = min(per_split.values())
    parts = []
    for split in [s for s in SPLIT_ORDER if s in per_split]:
        rows = cat.filter(pl.col("split") == split)
        n = n_equal if sampling.mode == "equalize" else rows.height
        if sampling.max_per_cell is not None:
            n = min(n, sampling.max_per_cell)
        order = rng.permutation(rows.height)[:n]
        chosen = rows[order.tolist()]
        n_heldout = int(round(n * heldout_fraction)) if n >= 2 else 0
        n_heldout = min(max(n_heldout, 1 if n >= 2 else 0), n - 1) if n >= 2 else 0
        heldout = np.zeros(n, dtype=bool)
        heldout[n - n_heldout :] = True
        parts.append(chosen.with_columns(pl.Series("heldout", heldout)))
    return pl.concat(parts)


@dataclass
class Profile:
    counts: pl.DataFrame  # category_key x split counts, raw and sampled
    warnings: list[str]


def profile(
    raw_counts: pl.DataFrame,
    sample_counts: pl.DataFrame,
    imbalance_ratio: float = 2.0,
    min_cell: int = 10,
) -> Profile:
    """Counts per category x split and the seed's imbalance warnings.

    Both inputs have columns ``category_key, split, n``. Warnings: a split missing from a category,
    a cell smaller than ``min_cell``, or the largest split of a category more than ``imbalance_ratio``
    times its smallest; and categories whose totals differ by more than that ratio.
    """
    wide = raw_counts.pivot(on="split", index="category_key", values="n").fill_null(0)
    splits = [s for s in SPLIT_ORDER if s in wide.columns]
    warnings = []
    for row in wide.iter_rows(named=True):
        cells = {s: row[s] for s in splits}
        cat = row["category_key"]
        for s, n in cells.items():
            if n == 0:
                warnings.append(f"{cat}: no '{s}' prompts")
            elif n < min_cell:
                warnings.append(f"{cat}: only {n} '{s}' prompts (< {min_cell})")
        present = [n for n in cells.values() if n > 0]
        if present and max(present) > imbalance_ratio * min(present):
            warnings.append(f"{cat}: split imbalance {cells} (max/min > {imbalance_ratio})")
    totals = wide.select(pl.sum_horizontal(splits)).to_series()
    if totals.len() and totals.max() > imbalance_ratio * max(totals.min(), 1):
        warnings.append(
            f"category sizes range from {totals.min()} to {totals.max()} (ratio > {imbalance_ratio})"
        )
    sampled = sample_counts.rename({"n": "n_sampled"})
    counts = (
        raw_counts.join(sampled, on=["category_key", "split"], how="left")
        .fill_null(0)
        .sort(["category_key", "split"])
    )
    return Profile(counts=counts, warnings=warnings)


def profile_pivot(counts: pl.DataFrame) -> pl.DataFrame:
    """One row per category, one column per split: ``"all (sampled)"`` counts, then the totals, so
    ten categories take ten rows, not thirty."""
    splits = [sp for sp in SPLIT_ORDER if sp in set(counts["split"].to_list())]
    cell = pl.format("{} ({})", pl.col("n"), pl.col("n_sampled"))
    wide = (
        counts.with_columns(cell.alias("cell"))
        .pivot(on="split", index="category_key", values="cell")
        .fill_null("0 (0)")
    )
    totals = counts.group_by("category_key").agg(
        pl.col("n").sum().alias("total"), pl.col("n_sampled").sum().alias("sampled")
    )
    return (
        wide.select("category_key", *splits)
        .join(totals, on="category_key")
        .sort("category_key")
        .rename({"category_key": "category"})
    )


def plot_profile(counts: pl.DataFrame, path: Path) -> Path:
    """Grouped bars: prompts per category and split (raw, with the sampled count hatched)."""
    from refusal_assets.plots import save_png

    return save_png(profile_figure(counts), path)


def profile_figure(counts: pl.DataFrame):
    """The figure of :func:`plot_profile` (a matplotlib ``Figure``), legend outside the bars."""
    from refusal_assets.plots import new_figure

    cats = sorted(counts["category_key"].unique().to_list())
    splits = [s for s in SPLIT_ORDER if s in set(counts["split"].to_list())]
    x = np.arange(len(cats))
    width = 0.8 / max(len(splits), 1)
    # constrained layout leaves room for the legend outside the axes, where it covers no bar
    fig = new_figure((max(6, len(cats) * 0.9) + 1.6, 4), constrained=True)
    ax = fig.add_subplot()
    for i, split in enumerate(splits):
        sub = {
            r["category_key"]: r
            for r in counts.filter(pl.col("split") == split).iter_rows(named=True)
        }
        raw = [sub.get(c, {}).get("n", 0) for c in cats]
        sampled = [sub.get(c, {}).get("n_sampled", 0) for c in cats]
        bars = ax.bar(x + i * width, raw, width, label=f"{split} (all)", alpha=0.45)
        ax.bar(
            x + i * width,
            sampled,
            width,
            color=bars.patches[0].get_facecolor(),
            alpha=1.0,
            hatch="//",
            label=f"{split} (sampled)",
        )
    ax.set_xticks(x + width * (len(splits) - 1) / 2, cats, rotation=30, ha="right")
    ax.set_ylabel("prompts")
    ax.set_title("Prompts per category and split")
    ax.legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False
    )
    return fig
