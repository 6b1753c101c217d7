"""Resources: the compute device and where asset files are stored."""

from __future__ import annotations

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

    def setup(self) -> str:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self.resolved_device()


class StorageResource(dg.ConfigurableResource):
    """Root folder of every asset file (Parquet, safetensors, JSON, PNG, HTML)."""

    root: str

    @property
    def files(self) -> Storage:
        return Storage(self.root)
