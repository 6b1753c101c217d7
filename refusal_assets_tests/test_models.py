"""Model loading: GGUF assembly with checksum, the tiny model's cache, architecture checks, local
folders, and (slow) the packaged default model.

The slow test converts the packaged GGUF once (~50 s) into ``$REFUSAL_ASSETS_CACHE``. The conftest
gives every session a fresh temporary cache unless that variable is already set, so to convert
only once across runs point it at a lasting folder, e.g.::

    REFUSAL_ASSETS_CACHE=~/.cache/refusal_assets pytest -m slow refusal_assets_tests/test_models.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import time
from pathlib import Path

import pytest
import torch

from refusal_assets.config import ModelConfig, load_config
from refusal_assets.lm.models import (
    PACKAGED_PARTS,
    ModelLoadError,
    assemble_gguf,
    build_tiny_model,
    cache_root,
    load_model,
    packaged_model_folder,
)
from refusal_assets_tests.conftest import ROOT


def quiet(_s: str) -> None:
    pass


def resolve(p: str | Path) -> Path:
    return Path(p)


def fresh_load(cfg, resolve_fn=None, device="cpu", log=quiet):
    """load_model, bypassing its in-process reuse of the last model (where it has one): a real load."""
    kwargs = {"reuse": False} if "reuse" in inspect.signature(load_model).parameters else {}
    return load_model(cfg, resolve_fn or resolve, device, log, **kwargs)


def model_cfg(**kw) -> ModelConfig:
    base = dict(
        id="tiny-test",
        source="tiny",
        architecture={"n_layers": 4, "d_model": 64},
        activation_layers=["residuals_1"],
    )
    return ModelConfig.model_validate({**base, **kw})


# ------------------------------------------------------------------------------------ GGUF parts
def _parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    chunks = [bytes(range(256)) * 40, b"GGUF-middle" * 1000, b"\x00\x01tail" * 333]
    paths = []
    for i, c in enumerate(chunks, start=1):
        p = tmp_path / "site-packages" / f"part{i}" / "data" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(c)
        paths.append(p)
    return paths, b"".join(chunks)


def test_assemble_gguf_with_correct_checksum(tmp_path):
    parts, whole = _parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    out = assemble_gguf(parts, dest, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert out == dest and dest.read_bytes() == whole
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]  # no .partial left
    # a second call reuses the file
    mtime = dest.stat().st_mtime_ns
    assert (
        assemble_gguf(parts, dest, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
        == dest
    )
    assert dest.stat().st_mtime_ns == mtime


def test_assemble_gguf_corrupted_part_raises_and_leaves_nothing(tmp_path):
    parts, whole = _parts(tmp_path)
    size, digest = len(whole), hashlib.sha256(whole).hexdigest()
    data = bytearray(parts[1].read_bytes())
    data[17] ^= 0xFF  # one byte flipped: same size, other checksum
    parts[1].write_bytes(bytes(data))
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelLoadError) as e:
        assemble_gguf(parts, dest, size=size, sha256=digest)
    msg = str(e.value)
    assert "sha256" in msg and digest in msg and "reinstall" in msg
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".partial").exists()
    assert list(dest.parent.iterdir()) == []


def test_assemble_gguf_missing_bytes_raises(tmp_path):
    parts, whole = _parts(tmp_path)
    with pytest.raises(
        ModelLoadError,
        match=f"size {len(whole) - len(parts[2].read_bytes())} \\(expected {len(whole)}\\)",
    ):
        assemble_gguf(
            parts[:2],
            tmp_path / "cache" / "m.gguf",
            size=len(whole),
            sha256=hashlib.sha256(whole).hexdigest(),
        )
    assert list((tmp_path / "cache").iterdir()) == []


# ------------------------------------------------------------------------------------ tiny model
def test_tiny_model_second_load_reuses_the_folder(tmp_path):
    folder = tmp_path / "tiny"
    cfg = model_cfg(path=str(folder))
    m1, t1 = fresh_load(cfg)
    config_json = folder / "config.json"
    stamp = config_json.stat().st_mtime_ns
    weights = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    m2, t2 = fresh_load(cfg)
    assert m2 is not m1
    assert config_json.stat().st_mtime_ns == stamp
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == weights
    assert not folder.with_name("tiny.partial").exists()
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # what load_model promises about both
    for m, t in ((m1, t1), (m2, t2)):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert t.padding_side == "left" and t.pad_token is not None and t.chat_template
        assert (m.config.num_hidden_layers, m.config.hidden_size) == (4, 64)


def test_tiny_model_default_folder_is_in_the_cache(tiny_cfg):
    cfg = tiny_cfg.models[0]
    load_model(cfg, tiny_cfg.resolve, "cpu", quiet)
    arch = f"{cfg.model_key}-L{cfg.architecture.n_layers}-d{cfg.architecture.d_model}"
    assert (cache_root() / "tiny" / arch / "config.json").is_file()


def test_architecture_disagreeing_with_weights_raises(tmp_path):
    folder = build_tiny_model(tmp_path / "tiny4", n_layers=4, d_model=64)
    with pytest.raises(ModelLoadError, match="n_layers") as e:
        load_model(
            model_cfg(
                source="local", path=str(folder), architecture={"n_layers": 3, "d_model": 64}
            ),
            resolve,
            "cpu",
            quiet,
        )
    assert (
        "n_layers=3" in str(e.value)
        and "n_layers=4" in str(e.value)
        and "architecture" in str(e.value)
    )
    with pytest.raises(ModelLoadError, match="d_model=32"):
        load_model(
            model_cfg(
                source="local", path=str(folder), architecture={"n_layers": 4, "d_model": 32}
            ),
            resolve,
            "cpu",
            quiet,
        )
    # the same through source: tiny pointing at an existing folder (it is not rebuilt to match)
    with pytest.raises(ModelLoadError, match="n_layers=3"):
        load_model(
            model_cfg(path=str(folder), architecture={"n_layers": 3, "d_model": 64}),
            resolve,
            "cpu",
            quiet,
        )


def test_local_folder_without_config_json(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="no config.json") as e:
        load_model(model_cfg(source="local", path=str(folder)), resolve, "cpu", quiet)
    assert str(folder) in str(e.value)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(model_cfg(source="local", path=str(tmp_path / "missing")), resolve, "cpu", quiet)


def test_local_folder_with_broken_weights(tmp_path):
    folder = build_tiny_model(tmp_path / "tiny", n_layers=4, d_model=64)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(model_cfg(source="local", path=str(folder)), resolve, "cpu", quiet)


def test_gguf_source_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(model_cfg(source="gguf", path=str(tmp_path / "x.gguf")), resolve, "cpu", quiet)


# --------------------------------------------------------------------------- packaged default model
def _packaged_missing() -> list[str]:
    return [p for p in PACKAGED_PARTS if importlib.util.find_spec(p) is None]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(_packaged_missing()),
    reason=f"packages {[p.replace('_', '-') for p in _packaged_missing()]} "
    "(the default model's GGUF parts) are not installed",
)
def test_packaged_default_model_loads():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    mc = cfg.models[0]
    assert mc.source == "packaged"
    t0 = time.perf_counter()
    model, tok = fresh_load(mc, cfg.resolve)  # converts once per cache folder (~50 s)
    first = time.perf_counter() - t0
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (24, 896)
    folder = packaged_model_folder(quiet)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob("*.gguf")) and not list(
        folder.parent.glob("*.partial")
    )  # GGUF removed
    del model
    t0 = time.perf_counter()
    model, tok = fresh_load(mc, cfg.resolve)
    second = time.perf_counter() - t0
    assert second <= 10, f"second load took {second:.1f} s (first {first:.1f} s)"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (24, 896)
    assert tok.chat_template and tok.padding_side == "left"

    from refusal_assets.lm.activations import forward_sites
    from refusal_assets.lm.chat import encode_chat
    from refusal_assets.lm.sites import Site

    batch = encode_chat(tok, ["What is the capital of France?", "Hi"])
    out = forward_sites(model, batch, [Site(18, "resid")])
    assert out[Site(18, "resid")].shape == (2, batch.input_ids.shape[1], 896)
    assert torch.isfinite(out[Site(18, "resid")]).all()
