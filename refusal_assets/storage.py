"""Where asset files live, and how they are written: temp name + rename, never a half file."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def safe_part(value: str, what: str = "key") -> str:
    """A path component that cannot escape its folder (no ``/``, ``..``, leading dot, empty)."""
    if not _SAFE_PART.match(value) or ".." in value:
        raise ValueError(f"unsafe {what} {value!r}: it would not stay inside the storage folder")
    return value


def category_key(category: str) -> str:
    """A category name as a partition key: lower-case, spaces to '-', and nothing that escapes a folder."""
    key = re.sub(r"\s+", "-", category.strip().lower())
    return safe_part(key, "category")


class Storage:
    """The folder that holds every asset file, laid out ``<root>/<asset>/<partition parts>/...``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, asset: str, *parts: str, filename: str | None = None) -> Path:
        folder = self.root / safe_part(asset, "asset name")
        for part in parts:
            folder = folder / safe_part(part, "partition key")
        return folder / filename if filename else folder


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``, else delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():  # mkstemp makes 0600 files; results should read like any other file
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, final: Path) -> Path:
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp)
    return final


def write_text(text: str, final: Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


def write_safetensors(tensors: dict, final: Path) -> Path:
    """``{name: torch.Tensor}`` as one safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp))
    return final


def write_bytes(data: bytes, final: Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return final


def read_parquet(path: Path, what: str = "asset file") -> pa.Table:
    """Read a Parquet file; a missing or truncated one is a clear error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (materialize the upstream asset first)")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable Parquet ({e}); rematerialize this partition") from e
