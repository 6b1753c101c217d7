"""One streaming pass over a site's stored activation rows, encoded with its SAE.

Row groups are read one at a time (each is one batch of prompts as the activation writer stored it,
so a prompt never spans two of them) and encoded; per latent the pass keeps running statistics,
the ``n_top`` highest *distinct* rows (a vector seen before, e.g. a chat-template position shared
by every prompt, is a candidate only once) and a uniform sample of the rows where it fires (a
bottom-k sketch over random keys), each with the latent's activations on the tokens around it.
Memory holds one row group and ``[slots, d_sae, window]`` arrays, never the site's rows.

Rows whose norm exceeds the SAE's ``max_input_norm`` (massive activations: the SAE was not trained
on them and the splice leaves them untouched) are counted and skipped: they are neither examples
nor part of any statistic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from refusal_assets.sae.model import TopKSAE

CORPUS = "corpus"
"""Category (and split) of the SAE corpus's rows, which belong to no study category."""
HISTOGRAM_EDGES = np.geomspace(1e-3, 1e3, 61)
"""Shared log-spaced bins (10 per decade) of firing activations; outliers go to the end bins."""
READ_COLUMNS = ["vector", "prompt_id", "split", "token_index"]


@dataclass(frozen=True, kw_only=True)
class ActivationSource:
    """One stored activation file and its prompts' category (``CORPUS`` for the SAE corpus)."""

    path: Path
    category: str


@dataclass(frozen=True, kw_only=True)
class ExampleSlots:
    """Up to ``n`` examples per latent; arrays ``[n, d_sae]`` (``window``: ``[n, d_sae, 2r+1]``).

    An empty slot has ``activation`` 0 and ``row`` -1. ``row`` numbers the stored rows of the
    sources in order (0-based, over every row, massive ones included); ``prompt`` indexes
    :attr:`SiteScan.prompt_ids`. ``window[..., j]`` is the latent's activation at token
    ``token_index - r + j`` of the same prompt, NaN where that token has no stored row.
    """

    activation: np.ndarray
    row: np.ndarray
    prompt: np.ndarray
    token_index: np.ndarray
    window: np.ndarray


@dataclass(frozen=True, kw_only=True)
class SiteScan:
    """Everything the pass kept. Per-latent arrays ``[d_sae]``; per-group ``[n_groups, d_sae]``."""

    d_sae: int
    n_rows: int
    """Rows covered by the statistics (massive rows excluded)."""
    n_distinct_rows: int
    n_massive_rows: int
    n_fires: np.ndarray
    activation_sum: np.ndarray
    max_activation: np.ndarray
    histogram: np.ndarray
    """``[d_sae, len(HISTOGRAM_EDGES) - 1]`` counts of firing activations."""
    groups: tuple[tuple[str, str], ...]
    """(category, split) of each group row."""
    group_rows: np.ndarray
    group_fires: np.ndarray
    group_sum: np.ndarray
    top: ExampleSlots
    """Highest distinct rows, rank order (slot 0 = highest)."""
    sample: ExampleSlots
    """Uniform sample of distinct firing rows, in no order."""
    prompt_ids: tuple[str, ...]
    prompt_category: tuple[str, ...]
    prompt_split: tuple[str, ...]
    window_radius: int
    sources: tuple[ActivationSource, ...]
    source_rows: tuple[int, ...]


class _Slots:
    """Running per-latent examples with a priority; merged chunk by chunk with ``topk``."""

    def __init__(self, n: int, d_sae: int, width: int):
        self.n = n
        self.priority = torch.full((n, d_sae), -torch.inf)
        self.fields = {
            "activation": torch.zeros(n, d_sae),
            "row": torch.full((n, d_sae), -1, dtype=torch.int64),
            "prompt": torch.full((n, d_sae), -1, dtype=torch.int32),
            "token_index": torch.full((n, d_sae), -1, dtype=torch.int32),
            "window": torch.full((n, d_sae, width), torch.nan),
        }

    def merge(self, priority: Tensor, fields: dict[str, Tensor]) -> None:
        both = torch.cat([self.priority, priority])
        self.priority, idx = both.topk(self.n, dim=0)  # [n, d_sae]
        for name, old in self.fields.items():
            cat = torch.cat([old, fields[name]])
            index = idx if cat.ndim == 2 else idx[..., None].expand(-1, -1, cat.shape[2])
            self.fields[name] = cat.gather(0, index)

    def frozen(self) -> ExampleSlots:
        empty = ~torch.isfinite(self.priority)
        out = {k: v.clone() for k, v in self.fields.items()}
        out["activation"][empty], out["row"][empty] = 0.0, -1
        return ExampleSlots(**{k: v.numpy() for k, v in out.items()})


def _row_hashes(vectors: np.ndarray, multipliers: np.ndarray) -> np.ndarray:
    """A 64-bit hash per float16 row (its bits times random odd multipliers, wrapping): equal rows
    hash equally; distinct rows collide with probability ~2^-60."""
    return (vectors.view(np.uint16).astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)


def _windows(z: Tensor, idx: Tensor, prompt: Tensor, token: Tensor, radius: int) -> Tensor:
    """``[n, d_sae, 2r+1]``: latent ``j``'s activations around chunk row ``idx[i, j]``, by token
    offset."""
    m = z.shape[0]
    width = 2 * radius + 1
    out = torch.full((*idx.shape, width), torch.nan)
    p0, t0 = prompt[idx], token[idx]
    # a prompt's rows are contiguous and ascend in token_index: its window lies within +-r rows
    for offset in range(-radius, radius + 1):
        rows = idx + offset
        ok = (rows >= 0) & (rows < m)
        rows = rows.clamp(0, m - 1)
        dt = token[rows] - t0
        ok &= (prompt[rows] == p0) & (dt.abs() <= radius)
        pos = (dt + radius).clamp(0, width - 1)[..., None]
        keep = out.gather(2, pos).squeeze(-1)
        out.scatter_(2, pos, torch.where(ok, z.gather(0, rows), keep)[..., None])
    return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` inside the block: the bookkeeping is many small ops,
    which several threads make slower (10x on a loaded 2-core machine), while the encoding's matmul
    gains from them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Pass:
    """The pass's running state (:func:`scan_site` drives it)."""

    def __init__(self, d_sae: int, n_top: int, n_sample: int, radius: int, seed: int):
        self.d_sae, self.radius = d_sae, radius
        self.encode_threads = torch.get_num_threads()
        width = 2 * radius + 1
        self.top, self.sample = _Slots(n_top, d_sae, width), _Slots(n_sample, d_sae, width)
        self.generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.multipliers: np.ndarray | None = None
        self.rng = rng
        self.seen: set[int] = set()
        self.n_fires = torch.zeros(d_sae, dtype=torch.int64)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        n_bins = len(HISTOGRAM_EDGES) - 1
        self.hist = torch.zeros(d_sae * n_bins, dtype=torch.int64)
        self.edges = torch.from_numpy(HISTOGRAM_EDGES[1:-1]).float()
        self.groups: dict[tuple[str, str], int] = {}
        self.group_rows: list[int] = []
        self.group_fires: list[Tensor] = []
        self.group_sum: list[Tensor] = []
        self.prompts: dict[str, int] = {}
        self.prompt_meta: list[tuple[str, str]] = []
        self.n_rows = self.n_distinct = self.n_massive = self.row_base = 0

    def _group(self, key: tuple[str, str]) -> int:
        if key not in self.groups:
            self.groups[key] = len(self.groups)
            self.group_rows.append(0)
            self.group_fires.append(torch.zeros(self.d_sae, dtype=torch.int64))
            self.group_sum.append(torch.zeros(self.d_sae, dtype=torch.float64))
        return self.groups[key]

    def chunk(self, table: pa.Table, category: str, sae: TopKSAE, max_norm: float) -> None:
        col = table.column("vector").combine_chunks()
        d = col.type.list_size
        vectors = np.asarray(
            col.flatten().to_numpy(zero_copy_only=False), dtype=np.float16
        ).reshape(-1, d)
        m = vectors.shape[0]
        if self.multipliers is None:
            self.multipliers = self.rng.integers(1, 2**63, size=d, dtype=np.uint64) * 2 + 1
        split = table.column("split").to_pylist()
        pids = table.column("prompt_id").to_pylist()
        codes = np.empty(m, np.int32)
        group = np.empty(m, np.int64)
        for i, (pid, sp) in enumerate(zip(pids, split)):
            if (code := self.prompts.get(pid)) is None:
                code = self.prompts[pid] = len(self.prompt_meta)
                self.prompt_meta.append((category, sp))
            codes[i] = code
            group[i] = self._group((category, sp))
        token = torch.from_numpy(table.column("token_index").to_numpy().astype(np.int32))
        typical = np.linalg.norm(vectors.astype(np.float32), axis=-1) <= max_norm
        hashes = _row_hashes(vectors, self.multipliers)
        distinct = np.zeros(m, bool)
        for i, h in enumerate(hashes.tolist()):
            if h not in self.seen:
                self.seen.add(h)
                distinct[i] = True
        with torch.no_grad(), _threads(self.encode_threads):
            z = sae.encode(torch.from_numpy(vectors.copy()).float())  # [m, d_sae]
        keep = torch.from_numpy(typical)
        z[~keep] = 0.0  # massive rows: no statistic, no example
        self._statistics(z, keep, torch.from_numpy(group))
        self.n_massive += int((~typical).sum())
        self.n_distinct += int((distinct & typical).sum())
        candidate = torch.from_numpy(distinct & typical)[:, None] & (z > 0)  # [m, d_sae]
        prompt = torch.from_numpy(codes)
        self._offer(self.top, torch.where(candidate, z, -torch.inf), z, prompt, token)
        keys = torch.rand(z.shape, generator=self.generator)
        self._offer(self.sample, torch.where(candidate, -keys, -torch.inf), z, prompt, token)
        self.row_base += m

    def _statistics(self, z: Tensor, keep: Tensor, group: Tensor) -> None:
        fires = z > 0
        self.n_rows += int(keep.sum())
        self.n_fires += fires.sum(0)
        self.sum += z.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, z.max(0).values)
        rows, latents = fires.nonzero(as_tuple=True)
        bins = torch.bucketize(z[rows, latents], self.edges)
        n_bins = len(HISTOGRAM_EDGES) - 1
        self.hist += torch.bincount(latents * n_bins + bins, minlength=self.hist.numel())
        for g in group.unique().tolist():
            in_g = (group == g) & keep
            self.group_rows[g] += int(in_g.sum())
            self.group_fires[g] += fires[in_g].sum(0)
            self.group_sum[g] += z[in_g].sum(0, dtype=torch.float64)

    def _offer(
        self, slots: _Slots, priority: Tensor, z: Tensor, prompt: Tensor, token: Tensor
    ) -> None:
        n = min(slots.n, z.shape[0])
        best, idx = priority.topk(n, dim=0)  # [n, d_sae]
        slots.merge(
            best,
            {
                "activation": z.gather(0, idx),
                "row": idx.to(torch.int64) + self.row_base,
                "prompt": prompt[idx],
                "token_index": token[idx],
                "window": _windows(z, idx, prompt, token, self.radius),
            },
        )

    def result(self, sources: Sequence[ActivationSource], source_rows: list[int]) -> SiteScan:
        n_bins = len(HISTOGRAM_EDGES) - 1
        stack = lambda xs, dtype: (  # noqa: E731
            torch.stack(xs).numpy() if xs else np.zeros((0, self.d_sae), dtype)
        )
        return SiteScan(
            d_sae=self.d_sae,
            n_rows=self.n_rows,
            n_distinct_rows=self.n_distinct,
            n_massive_rows=self.n_massive,
            n_fires=self.n_fires.numpy(),
            activation_sum=self.sum.numpy(),
            max_activation=self.max.numpy(),
            histogram=self.hist.view(self.d_sae, n_bins).numpy(),
            groups=tuple(self.groups),
            group_rows=np.array(self.group_rows, np.int64),
            group_fires=stack(self.group_fires, np.int64),
            group_sum=stack(self.group_sum, np.float64),
            top=self.top.frozen(),
            sample=self.sample.frozen(),
            prompt_ids=tuple(self.prompts),
            prompt_category=tuple(c for c, _ in self.prompt_meta),
            prompt_split=tuple(s for _, s in self.prompt_meta),
            window_radius=self.radius,
            sources=tuple(sources),
            source_rows=tuple(source_rows),
        )


def scan_site(
    sources: Sequence[ActivationSource],
    sae: TopKSAE,
    *,
    max_input_norm: float = float("inf"),
    n_top: int = 20,
    n_sample: int = 32,
    window_radius: int = 6,
    seed: int = 0,
) -> SiteScan:
    """Stream ``sources`` in order, a row group at a time, through ``sae`` (see the module doc)."""
    if not sources:
        raise ValueError("no activation files to scan")
    state = _Pass(sae.d_sae, n_top, n_sample, window_radius, seed)
    source_rows = []
    with _threads(1):
        for source in sources:
            _scan_file(state, source, sae, max_input_norm)
            source_rows.append(state.row_base - sum(source_rows))
    return state.result(sources, source_rows)


def _scan_file(state: _Pass, source: ActivationSource, sae: TopKSAE, max_input_norm: float) -> None:
    """Feed one activation file to the pass, row group by row group."""
    try:
        pf = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"{source.path}: not a readable activation file ({e})") from e
    missing = [c for c in READ_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{source.path}: missing column(s) {missing}")
    width = pf.schema_arrow.field("vector").type.list_size
    if width != sae.d_in:
        raise ValueError(
            f"{source.path}: vectors of width {width}, but the SAE reads d_in {sae.d_in}"
        )
    for g in range(pf.num_row_groups):
        state.chunk(
            pf.read_row_group(g, columns=READ_COLUMNS), source.category, sae, max_input_norm
        )
        pa.default_memory_pool().release_unused()
