from pathlib import Path

import pytest
import yaml

from refusal_assets.config import ConfigError, load_config, model_key_from_id
from refusal_assets.sites import Site, expand_sites

ROOT = Path(__file__).resolve().parent.parent


def _project(tmp_path: Path, model: dict, extra: dict | None = None) -> Path:
    (tmp_path / "configs" / "models").mkdir(parents=True)
    (tmp_path / "configs" / "models" / "m.yaml").write_text(yaml.safe_dump(model))
    cfg = {"data": {"path": "data"}, "models": ["models/m.yaml"], **(extra or {})}
    path = tmp_path / "configs" / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MODEL = {"id": "org/Some-Model", "source": "hub", "architecture": {"n_layers": 24, "d_model": 896}, "activation_layers": ["residuals_5"]}


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_project_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.models and cfg.site_keys()


@pytest.mark.parametrize("name", ["llama2_7b.yaml", "llama2_7b_all_layers.yaml", "llama2_7b_middle_layers.yaml", "mistral_7b_instruct.yaml", "qwen2.5-coder-0.5b-instruct.yaml"])
def test_seed_model_configs_validate(tmp_path, name):
    model = yaml.safe_load((ROOT / "configs" / "models" / name).read_text())
    cfg = load_config(_project(tmp_path, model))
    assert len(cfg.models[0].sites) >= 1


def test_unknown_key_names_file_and_key(tmp_path):
    path = _project(tmp_path, {**MODEL, "batchsize": 4})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "m.yaml" in str(e.value) and "batchsize" in str(e.value)


def test_layer_out_of_range_is_an_error(tmp_path):
    path = _project(tmp_path, {**MODEL, "activation_layers": ["residuals_30"]})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "m.yaml" in msg and "layer 30" in msg and "24 layers" in msg


def test_wrong_type_names_key(tmp_path):
    path = _project(tmp_path, {**MODEL, "batch_size": "many"})
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path)


def test_yaml_python_tags_are_refused(tmp_path):
    path = _project(tmp_path, MODEL)
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\nmodels: []\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shorthand_expansion():
    assert [s.name for s in expand_sites(["residuals_10-"], 12)] == ["resid10", "resid11"]
    assert len(expand_sites(["all"], 32)) == 32
    assert len(expand_sites(["residuals_0-31"], 32)) == 32
    sites = expand_sites(["residuals_5", "mlp_all", "attention_all"], 6)
    assert Site(5, "resid") in sites and Site(0, "mlp") in sites and Site(5, "attn") in sites and len(sites) == 13
    with pytest.raises(ValueError, match="cannot parse"):
        expand_sites(["layer five"], 6)
    with pytest.raises(ValueError, match="unknown site kind"):
        expand_sites(["layers_5"], 6)
    with pytest.raises(ValueError, match="empty range"):
        expand_sites(["residuals_5-2"], 6)


def test_model_keys_are_safe():
    assert model_key_from_id("meta-llama/Llama-2-7b-chat-hf") == "llama-2-7b-chat-hf"
    assert model_key_from_id("../../etc|x,y[0]") == "etc-x-y-0"


def test_unsafe_explicit_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match="key"):
        load_config(_project(tmp_path, {**MODEL, "key": "../evil"}))


def test_section_hash_changes_only_with_its_section(tiny_cfg):
    from refusal_assets.config import ProjectConfig

    changed = ProjectConfig.model_validate({**tiny_cfg.model_dump(), "sae": {**tiny_cfg.sae.model_dump(), "k": 99}})
    assert changed.section_hash("sae") != tiny_cfg.section_hash("sae")
    assert changed.section_hash("data") == tiny_cfg.section_hash("data")
