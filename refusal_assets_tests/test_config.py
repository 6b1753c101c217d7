from pathlib import Path

import pytest
import yaml

from refusal_assets.config import ConfigError, load_config, model_key_from_id
from refusal_assets.lm.sites import Site, expand_sites

ROOT = Path(__file__).resolve().parent.parent


def _project(tmp_path: Path, model: dict, extra: dict | None = None) -> Path:
    (tmp_path / "configs" / "models").mkdir(parents=True)
    (tmp_path / "configs" / "models" / "m.yaml").write_text(yaml.safe_dump(model))
    cfg = {"data": {"path": "data"}, "models": ["models/m.yaml"], **(extra or {})}
    path = tmp_path / "configs" / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MODEL = {
    "id": "org/Some-Model",
    "source": "hub",
    "architecture": {"n_layers": 24, "d_model": 896},
    "activation_layers": ["residuals_5"],
}


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_project_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.models and cfg.site_keys()


@pytest.mark.parametrize(
    "name",
    [
        "llama2_7b.yaml",
        "llama2_7b_all_layers.yaml",
        "llama2_7b_middle_layers.yaml",
        "mistral_7b_instruct.yaml",
        "qwen2.5-coder-0.5b-instruct.yaml",
    ],
)
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
    assert (
        Site(5, "resid") in sites
        and Site(0, "mlp") in sites
        and Site(5, "attn") in sites
        and len(sites) == 13
    )
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

    changed = ProjectConfig.model_validate(
        {**tiny_cfg.model_dump(), "sae": {**tiny_cfg.sae.model_dump(), "k": 99}}
    )
    assert changed.section_hash("sae") != tiny_cfg.section_hash("sae")
    assert changed.section_hash("data") == tiny_cfg.section_hash("data")


def test_output_neutral_knobs_stay_out_of_the_hashes(tiny_cfg):
    from refusal_assets_tests.automation_world import variant

    knobs = variant(
        tiny_cfg,
        sae__thresholds={"max_fvu": 0.01, "max_dead_fraction": 0.01},
        models__0__batch_size=1,
        sae__splice={"prompts_per_category": 2, "batch_size": 1},
        data__categories=["harassment", "illegal", "privacy", "violence", "hate"],
    )
    for section in ("data", "sae", "circuits", "comparison", "report"):
        assert knobs.section_hash(section) == tiny_cfg.section_hash(section), section
    key = tiny_cfg.models[0].model_key
    assert knobs.model_hash(key) == tiny_cfg.model_hash(key)
    assert knobs.model_hash(key, "activations") == tiny_cfg.model_hash(key, "activations")
    # settings that change outputs do change them
    assert variant(tiny_cfg, sae__k=7).section_hash("sae") != tiny_cfg.section_hash("sae")
    assert variant(tiny_cfg, sae__splice={"prompts_per_category": 3, "batch_size": 8}).section_hash(
        "sae"
    ) != tiny_cfg.section_hash("sae")
    assert variant(tiny_cfg, data__seed=1).section_hash("data") != tiny_cfg.section_hash("data")


def test_model_hash_is_per_model_and_per_use(tiny_cfg):
    from refusal_assets_tests.automation_world import variant

    a = tiny_cfg.models[0].model_key
    two = variant(
        tiny_cfg,
        models=[
            tiny_cfg.models[0].model_dump(),
            {**tiny_cfg.models[0].model_dump(), "id": "tiny-b", "key": "tiny-b"},
        ],
    )
    assert two.model_hash(a) == tiny_cfg.model_hash(a), (
        "adding model B leaves model A's version alone"
    )
    assert two.model_hash("tiny-b") != two.model_hash(a)
    longer = variant(tiny_cfg, models__0__generation={"max_new_tokens": 9})
    assert longer.model_hash(a) != tiny_cfg.model_hash(a)
    assert longer.model_hash(a, "activations") == tiny_cfg.model_hash(a, "activations"), (
        "generation settings do not change activations"
    )
    prompted = variant(tiny_cfg, models__0__chat_template={"system_prompt": "Be brief."})
    assert prompted.model_hash(a, "activations") != tiny_cfg.model_hash(a, "activations")
    with pytest.raises(ValueError, match="per model"):
        tiny_cfg.section_hash("models")


def test_train_categories_must_be_categories_of_the_config(tiny_cfg, tmp_path):
    from refusal_assets.defs.build import build_defs
    from refusal_assets_tests.automation_world import variant

    with pytest.raises(ConfigError, match=r"sae\.train_categories.*\['hate'\]"):
        build_defs(variant(tiny_cfg, sae__train_categories=["harassment", "hate"]), tmp_path)
    with pytest.raises(ConfigError, match="train_categories"):
        load_config(_project(tmp_path, MODEL, {"sae": {"train_categories": []}}))


def test_backfill_completes_bare_sae_site_keys():
    from refusal_assets.app.backfill import backfill_params

    assert backfill_params("sae", ["tiny-qwen2__resid1", "all|tiny-qwen2__resid2"])[
        "partitionNames"
    ] == [
        "all|tiny-qwen2__resid1",
        "all|tiny-qwen2__resid2",
    ]
    assert backfill_params("circuit", ["privacy|tiny-qwen2"])["partitionNames"] == [
        "privacy|tiny-qwen2"
    ]
    assert backfill_params("activations,sae", ["x"])["partitionNames"] == ["x"]


def test_instance_per_config_name(tiny_cfg, tmp_path, monkeypatch):
    from refusal_assets.app import settings
    from refusal_assets_tests.automation_world import variant

    other = variant(tiny_cfg, name="tiny-alt")
    assert settings.instance_home(tmp_path, tiny_cfg) == tmp_path / "tiny"
    assert settings.instance_home(tmp_path, other) == tmp_path / "tiny-alt"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / settings.INSTANCE_MARKER).write_text("tiny\n")
    assert settings.instance_home(tmp_path / "tiny", tiny_cfg) == tmp_path / "tiny", (
        "already this config's instance"
    )
    # another dataset (--data-dir) is another instance, as it is another storage folder, and its SAEs train on all
    # its categories
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path / "xstest"))
    monkeypatch.setenv(settings.CONFIG_ENV, str(ROOT / "configs" / "tiny.yaml"))
    assert settings.instance_home(tmp_path, tiny_cfg) == tmp_path / "tiny--xstest"
    assert settings.storage_root(tiny_cfg).name == "tiny--xstest"
    assert settings.load_project().sae.train_categories is None


def test_sae_replicates_are_other_seeds_with_their_own_step_budget():
    from refusal_assets.config import SAEConfig

    cfg = SAEConfig(
        seed=0, max_steps=800, lr_decay_steps=200, replicates={"seeds": [1, 2], "max_steps": 150}
    )
    one = cfg.replicate(2)
    assert (one.seed, one.max_steps, one.lr_decay_steps) == (2, 150, 150)  # decay capped
    assert one.k == cfg.k and one.expansion_factor == cfg.expansion_factor
    assert cfg.replicate(1).replicates == cfg.replicates
    same_budget = SAEConfig(max_steps=800, lr_decay_steps=200, replicates={"seeds": [3]})
    assert (same_budget.replicate(3).max_steps, same_budget.replicate(3).lr_decay_steps) == (
        800,
        200,
    )
    with pytest.raises(ValueError, match="include sae.seed 0"):
        SAEConfig(seed=0, replicates={"seeds": [0, 1]})
    with pytest.raises(ValueError, match="seeds must be distinct"):
        SAEConfig(replicates={"seeds": [1, 1]})
