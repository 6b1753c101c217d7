"""Resources: the compute device and where asset files are stored."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import torch

from refusal_assets.storage import Storage

LOCK_DIR_ENV = "REFUSAL_ASSETS_DEVICE_LOCKS"
"""Folder of the per-device lock files (default: ``$DAGSTER_HOME``, else the temp folder). Every
process that shares the devices must use the same folder."""


class ComputeResource(dg.ConfigurableResource):
    """Device for model and SAE steps.

    ``device: auto`` = every visible CUDA device (``cuda`` on a one-GPU machine, ``cuda:0`` ..
    ``cuda:N-1`` on N GPUs), else CPU. ``devices`` lists them explicitly instead (e.g.
    ``["cuda:0", "cuda:2"]``). A step in :meth:`claim` gets a device no other step holds: one lock
    file per device, so with the ``gpu`` pool limit set to N, N steps run side by side, one per
    device, and a step that finds every device busy waits for the first one freed.
    """

    device: str = "auto"
    devices: list[str] = []
    """Devices to hand out, one step at a time each; empty = derived from ``device``."""
    torch_threads: int = 0
    """CPU threads for torch; 0 = torch's default."""
    serialize_device: bool = True
    """Hold a file lock per device while a step uses it. Dagster's pool claim on SQLite can race
    (two steps claiming the last slot at the same instant); the lock closes the gap on one machine,
    and with several devices it is also how a step finds a free one. Turning it off (a single
    device only) lets steps share the device with no waiting."""
    poll_s: float = 0.05
    """How often a step that found every device busy tries again."""

    def resolved_devices(self) -> list[str]:
        """The devices steps are spread over, each validated against this machine."""
        if self.devices:
            wanted = list(self.devices)
        elif self.device == "auto":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            # one GPU keeps the plain name "cuda", as before; several get one entry each
            wanted = ["cpu"] if n == 0 else ["cuda"] if n == 1 else [f"cuda:{i}" for i in range(n)]
        else:
            wanted = [self.device]
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"compute.devices lists a device twice: {wanted}")
        for d in wanted:
            if d.startswith("cuda"):
                if not torch.cuda.is_available():
                    raise RuntimeError(
                        f"device {d!r} requested but CUDA is not available on this machine"
                    )
                index = torch.device(d).index
                if index is not None and index >= torch.cuda.device_count():
                    raise RuntimeError(
                        f"device {d!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
                    )
        if len(wanted) > 1 and not self.serialize_device:
            raise ValueError(
                f"compute.serialize_device=false with several devices {wanted}: "
                "the per-device locks are how a step finds a free device"
            )
        return wanted

    def resolved_device(self) -> str:
        """The first device (the only one on a one-device machine)."""
        return self.resolved_devices()[0]

    def setup(self) -> list[str]:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self.resolved_devices()

    def lock_path(self, device: str) -> Path:
        folder = Path(
            os.environ.get(LOCK_DIR_ENV) or os.environ.get("DAGSTER_HOME") or tempfile.gettempdir()
        )
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".device-{device.replace(':', '-')}.lock"

    @contextlib.contextmanager
    def claim(self) -> Iterator[str]:
        """A device no other step holds, for the duration of the block (see ``serialize_device``)."""
        devices = self.setup()
        if not self.serialize_device:
            yield devices[0]
            return
        if len(devices) == 1:
            with self.lock_path(devices[0]).open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # blocking: the one device, whoever frees it
                yield devices[0]
            return
        # Several devices: take the first free one. Starting from a different device in each
        # process spreads simultaneous claims; each try is non-blocking so no step waits on
        # device 0 while device 1 is idle.
        start = os.getpid() % len(devices)
        order = devices[start:] + devices[:start]
        while True:
            for device in order:
                lock = self.lock_path(device).open("w")
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.close()
                    continue
                try:
                    if device.startswith("cuda"):
                        torch.cuda.set_device(
                            torch.device(device)
                        )  # so bare "cuda" tensors land here too
                    yield device
                finally:
                    lock.close()  # closing the file releases the lock
                return
            time.sleep(self.poll_s)


class StorageResource(dg.ConfigurableResource):
    """Root folder of every asset file (Parquet, safetensors, JSON, PNG, HTML)."""

    root: str

    @property
    def files(self) -> Storage:
        return Storage(self.root)
