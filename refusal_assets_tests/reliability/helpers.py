"""Shared helpers of the reliability suite (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from refusal_assets.config import ProjectConfig, load_config
from refusal_assets_tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
SAMPLE = ROOT / "data" / "orbench_sample"


def files_under(root: Path) -> set[str]:
    """Every file below ``root`` (hidden temp files included), as relative POSIX paths."""
    root = Path(root)
    if not root.exists():
        return set()
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()
    }


def tiny_cfg_with(overrides: dict | None = None) -> ProjectConfig:
    """The tiny project config with dotted-key overrides, e.g. ``{"data.path": "/x"}``."""
    return load_config(TINY, overrides or {})


def tiny_assets(cfg: ProjectConfig, storage: Path) -> tuple[dict[str, dg.AssetsDefinition], dict]:
    """(asset name -> AssetsDefinition, resources) of ``build_defs`` for ``cfg`` on CPU."""
    from refusal_assets.defs.build import build_defs

    defs = build_defs(cfg, Path(storage), device="cpu")
    assets = {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}
    return assets, defs.resources


QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def materialize(
    assets: list, resources: dict, partition_key: str | None = None, instance=None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources=resources,
        partition_key=partition_key,
        instance=instance,
        raise_on_error=False,
        run_config=QUIET,
    )


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """The user-code error of each failed step ("ClassName: message"): the outermost error that is not
    one of Dagster's wrappers (its own ``__cause__``, e.g. the UnicodeDecodeError under a DataError, is
    an implementation detail)."""
    out = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and err.cls_name.startswith("Dagster"):
                err = err.cause
            out.append(f"{err.cls_name}: {err.message.strip()}")
    return out


def python_script(code: str, env: dict | None = None, cwd: Path = ROOT, **kw) -> subprocess.Popen:
    """``python -c code`` with the suite's environment (model cache, offline hub) inherited."""
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **(env or {}),
    }  # see conftest.py
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=full_env, text=True, **kw)


class Child:
    """A ``python -c`` child whose stdout lines are read by a thread (no pipe deadlock, no select games)."""

    def __init__(self, code: str, env: dict | None = None, stderr_path: Path | None = None):
        import queue
        import threading

        self.stderr_path = stderr_path
        self._err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL
        self.proc = python_script(code, env, stdout=subprocess.PIPE, stderr=self._err)
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, wanted: str, timeout: float) -> None:
        """Block until the child prints the line ``wanted``; fail with its output on EOF or timeout."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = None
                if left > 0:
                    continue
            if line is None:
                self.kill()
                raise AssertionError(
                    f"child never printed {wanted!r} (rc={self.proc.poll()}); stdout={self.lines}; "
                    f"stderr tail={self.stderr_tail()}"
                )
            self.lines.append(line)
            if line == wanted:
                return

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        # drain what is left of stdout
        import queue

        while True:
            try:
                line = self._queue.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stderr_tail(self, n: int = 3000) -> str:
        if self._err is not subprocess.DEVNULL:
            self._err.flush()
        return (
            self.stderr_path.read_text()[-n:]
            if self.stderr_path and self.stderr_path.exists()
            else ""
        )
