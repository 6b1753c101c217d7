"""Resources: the compute device and where asset files are stored."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import dagster as dg

from refusal_assets.storage import Storage


class ComputeResource(dg.ConfigurableResource):
    """Device for model and SAE steps: ``auto`` = CUDA when present, else CPU."""

    device: str = "auto"
    torch_threads: int = 0
    """CPU threads for torch; 0 = torch's default."""

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} requested but CUDA is not available on this machine")
        return self.device

    serialize_device: bool = True
    """Also hold a file lock per device while a step uses it. Dagster's pool claim on SQLite can
    race (two steps claiming the last slot at the same instant); this closes the gap on one
    machine. Turn it off when the pool limit is above 1 (several GPUs) or on PostgreSQL."""

    def setup(self) -> str:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self.resolved_device()

    @contextlib.contextmanager
    def claim(self) -> Iterator[str]:
        """The device, held exclusively (see ``serialize_device``) for the duration of the block."""
        device = self.setup()
        if not self.serialize_device:
            yield device
            return
        folder = Path(os.environ.get("DAGSTER_HOME") or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f".device-{device.replace(':', '-')}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield device


class StorageResource(dg.ConfigurableResource):
    """Root folder of every asset file (Parquet, safetensors, JSON, PNG, HTML)."""

    root: str

    @property
    def files(self) -> Storage:
        return Storage(self.root)
