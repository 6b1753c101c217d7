"""Bounded-memory access to a site's activation rows for SAE training.

``ParquetRows`` streams the site's Parquet files once, row group by row group, into one flat float16
row file (``[n, d_in]``, C order) in a scratch folder, then serves any batch of row indices with
positional reads (``os.pread``) into a buffer of that batch's size. The batch order therefore stays a
global shuffle by the training generator, exactly the order of the in-memory path, so the two give the
same SAE weights for the same seed; resident memory holds one batch, not the site's rows (the page
cache the kernel keeps of the file is not the process's memory and is given back under pressure).
A plain memory map would count every page it ever touched in the process's RSS.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

VECTOR_COLUMN = "vector"


@runtime_checkable
class Rows(Protocol):
    """A table of ``len(self)`` vectors of width ``d_in`` that hands out rows by index."""

    @property
    def d_in(self) -> int: ...

    def __len__(self) -> int: ...

    def take(self, index: Tensor) -> Tensor:
        """Rows ``index [m]`` (int64, any order, repeats allowed) as ``[m, d_in]`` in that order."""
        ...


@dataclass(frozen=True)
class TensorRows:
    """The in-memory case: a ``[n, d_in]`` tensor."""

    vectors: Tensor

    @property
    def d_in(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def take(self, index: Tensor) -> Tensor:
        return self.vectors[index.to(self.vectors.device)]


def as_rows(vectors: Tensor | Rows) -> Rows:
    if isinstance(vectors, Tensor):
        if vectors.ndim != 2:
            raise ValueError(f"need vectors [n, d_in], got shape {tuple(vectors.shape)}")
        return TensorRows(vectors)
    if isinstance(vectors, Rows):
        return vectors
    raise TypeError(f"need a [n, d_in] tensor or a Rows source, got {type(vectors).__name__}")


def chunks(rows: Rows, index: Tensor, size: int) -> Iterator[Tensor]:
    """``rows.take`` of ``index`` in consecutive pieces of at most ``size`` rows."""
    for piece in index.split(size):
        yield rows.take(piece)


@dataclass
class ParquetRows:
    """Rows of one or more activation files (``vector``: fixed-size list of float16), kept on disk.

    ``group_ids [n]`` (int64, one per prompt, shared across files when ``prompt_id`` repeats) and
    ``post_instruction [n]`` are small per-row columns kept in memory; the vectors are not.
    """

    path: Path  # the flat float16 row file
    n: int
    width: int
    group_ids: np.ndarray
    post_instruction: np.ndarray
    norms: np.ndarray  # [n] float32 L2 norm of each row, for the massive-activation filter
    _fd: int = field(default=-1, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @classmethod
    def from_parquet(cls, paths: Sequence[Path], scratch: Path | None = None) -> ParquetRows:
        """Stream ``paths`` (in order) into a flat row file under ``scratch`` (a fresh temporary
        folder when None, removed with this object)."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("no activation files given")
        tmp = None
        if scratch is None:
            tmp = tempfile.TemporaryDirectory(prefix="sae-rows-")
            scratch = Path(tmp.name)
        scratch.mkdir(parents=True, exist_ok=True)
        flat = scratch / "rows.f16"
        width: int | None = None
        n = 0
        prompt_ids: list[np.ndarray] = []
        ids: dict[str, int] = {}
        post: list[np.ndarray] = []
        norms: list[np.ndarray] = []
        with open(flat, "wb") as out:
            for path in paths:
                if not path.is_file():
                    raise ValueError(f"{path}: activation file not found")
                try:
                    pf = pq.ParquetFile(path)
                except Exception as e:  # pyarrow raises several types for a damaged footer
                    raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
                names = pf.schema_arrow.names
                for col in (VECTOR_COLUMN, "prompt_id"):
                    if col not in names:
                        raise ValueError(f"{path}: missing column {col!r}")
                list_size = getattr(pf.schema_arrow.field(VECTOR_COLUMN).type, "list_size", None)
                if list_size is None:
                    raise ValueError(f"{path}: column 'vector' is not a fixed-size list")
                if width is None:
                    width = list_size
                elif list_size != width:
                    raise ValueError(
                        f"{path}: vectors of width {list_size}, but earlier files have {width}"
                    )
                cols = [VECTOR_COLUMN, "prompt_id"] + (
                    ["is_post_instruction"] if "is_post_instruction" in names else []
                )
                for g in range(pf.num_row_groups):  # one row group in memory at a time
                    table = pf.read_row_group(g, columns=cols)
                    flat_vals = (
                        table.column(VECTOR_COLUMN).combine_chunks().flatten()
                    )  # respects slicing
                    if flat_vals.type == pa.float16() and flat_vals.null_count == 0:
                        # a view of Arrow's buffer: no NumPy copy per row group
                        values = np.frombuffer(
                            flat_vals.buffers()[1],
                            dtype=np.float16,
                            count=len(flat_vals),
                            offset=flat_vals.offset * 2,
                        )
                    else:
                        values = flat_vals.to_numpy(zero_copy_only=False).astype(np.float16)
                    out.write(np.ascontiguousarray(values).data)  # no bytes copy
                    norms.append(
                        np.linalg.norm(values.reshape(-1, width).astype(np.float32), axis=-1)
                    )
                    n += table.num_rows
                    # prompt ids -> int codes per row group: a string per row would cost more than the vectors' index
                    enc = table.column("prompt_id").combine_chunks().dictionary_encode()
                    codes = np.array(
                        [ids.setdefault(v, len(ids)) for v in enc.dictionary.to_pylist()],
                        dtype=np.int64,
                    )
                    prompt_ids.append(codes[enc.indices.to_numpy(zero_copy_only=False)])
                    post.append(
                        table.column("is_post_instruction")
                        .to_numpy(zero_copy_only=False)
                        .astype(bool)
                        if "is_post_instruction" in table.column_names
                        else np.zeros(table.num_rows, bool)
                    )
                    del table, flat_vals, values, enc
                    pa.default_memory_pool().release_unused()  # else Arrow's pool keeps a share of every row group read
        assert width is not None
        group_ids = np.concatenate(prompt_ids) if prompt_ids else np.zeros(0, np.int64)
        rows = cls(
            flat,
            n,
            width,
            group_ids,
            np.concatenate(post) if post else np.zeros(0, bool),
            np.concatenate(norms) if norms else np.zeros(0, np.float32),
        )
        rows._tmp = tmp
        return rows

    def __post_init__(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size != self.n * self.width * 2:
            raise ValueError(
                f"{self.path}: {size} bytes, expected {self.n} rows x {self.width} float16"
            )

    @property
    def d_in(self) -> int:
        return self.width

    def __len__(self) -> int:
        return self.n

    def take(self, index: Tensor) -> Tensor:
        idx = index.cpu().numpy().astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row index out of range [0, {self.n}) for {self.path}")
        out = np.empty((idx.size, self.width), dtype=np.float16)
        row_bytes = self.width * 2
        if idx.size and idx[-1] - idx[0] + 1 == idx.size and (np.diff(idx) == 1).all():
            # a contiguous range (initialisation and evaluation passes): one read
            buf = os.pread(self._fd, idx.size * row_bytes, int(idx[0]) * row_bytes)
            out[:] = np.frombuffer(buf, dtype=np.float16).reshape(idx.size, self.width)
            return torch.from_numpy(out)
        order = np.argsort(
            idx, kind="stable"
        )  # ascending offsets: the reads go forward through the file
        for j in order:
            buf = os.pread(self._fd, row_bytes, int(idx[j]) * row_bytes)
            out[j] = np.frombuffer(buf, dtype=np.float16)
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self) -> None:
        with contextlib.suppress(OSError):  # interpreter shutdown may have closed things already
            self.close()


@dataclass(frozen=True)
class SubsetRows:
    """Rows ``keep`` of ``base`` (e.g. without the massive-activation rows), renumbered 0..len(keep)-1."""

    base: Rows
    keep: Tensor  # [m] int64 indices into base

    @property
    def d_in(self) -> int:
        return self.base.d_in

    def __len__(self) -> int:
        return int(self.keep.shape[0])

    def take(self, index: Tensor) -> Tensor:
        return self.base.take(self.keep[index.to(self.keep.device)])
