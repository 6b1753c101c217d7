"""`refusal-assets run` in a terminal: a live bar for the runs and for the running step's loop,
result lines on stdout as before, and the loops' progress lines in the Dagster event log."""

import io
import os
import subprocess
import sys

import dagster as dg

from refusal_assets import progress
from refusal_assets.app import runner
from refusal_assets_tests.conftest import ROOT


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_bar_wanted_follows_the_terminal_unless_the_env_says(monkeypatch):
    monkeypatch.delenv(progress.BAR_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert runner._console_bar_wanted()
    monkeypatch.setenv(progress.BAR_ENV, "0")
    assert not runner._console_bar_wanted()
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    monkeypatch.delenv(progress.BAR_ENV)
    assert not runner._console_bar_wanted()
    monkeypatch.setenv(progress.BAR_ENV, "1")
    assert runner._console_bar_wanted()


def test_run_draws_bars_and_logs_progress_to_dagster(tmp_path):
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REFUSAL_ASSETS_") or k == "REFUSAL_ASSETS_CACHE"
    }
    # stderr here is a file, not a terminal: the env var stands in for one, as the runner's docs say
    env.update(DAGSTER_HOME=str(home), **{progress.BAR_ENV: "1"}, COLUMNS="120", LINES="40")
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as err:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "refusal_assets.app.cli",
                "run",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--storage",
                str(tmp_path / "storage"),
                "--select",
                "orbench_prompts,prompt_sample,refusal_behaviour",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=600,
        )
    stderr = stderr_path.read_text()
    assert done.returncode == 0, done.stdout + stderr[-3000:]
    out = done.stdout.splitlines()
    # stdout keeps its plain result lines, one per run, with no bar in them
    results = [line for line in out if line.startswith("[")]
    assert len(results) == 12 and all(
        line.endswith(" s)") and " ok (" in line for line in results
    ), out
    assert not any("runs |" in line or "\r" in line for line in out)
    # the runner's bar (runs done, the running step) and the generation loop's bar on stderr
    assert "12/12 runs |" in stderr and "[12/12] refusal_behaviour violence|tiny-qwen2 (" in stderr
    assert "behaviour: generation:" in stderr and "prompts/s" in stderr

    instance = dg.DagsterInstance.from_config(str(home / "tiny"))  # one instance per config name
    try:
        lines = []
        for record in instance.get_run_records(
            dg.RunsFilter(tags={"dagster/partition": "violence|tiny-qwen2"})
        ):
            lines += [
                e.user_message
                for e in instance.all_logs(record.dagster_run.run_id)
                if e.user_message.startswith("behaviour: generation")
            ]
    finally:
        instance.dispose()
    assert lines[0].startswith("behaviour: generation: started, ") and lines[0].endswith(" prompts")
    n = int(lines[0].split()[3])
    assert n > 0 and f"{n}/{n} prompts (100 %), done in " in lines[-1] and "prompts/s" in lines[-1]
