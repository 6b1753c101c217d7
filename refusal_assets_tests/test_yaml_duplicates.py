"""A key given twice in any YAML file the project loads is an error naming the file, the key and
the line, where PyYAML alone keeps the last value without a word."""

import pytest
import yaml

from refusal_assets.config import ConfigError, UniqueKeyLoader, load_config, read_yaml
from refusal_assets_tests.conftest import ROOT

TINY = (ROOT / "configs" / "tiny.yaml").read_text()


def _write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_duplicated_top_level_section(tmp_path):
    text = TINY + "sae:\n  k: 4\n"
    # The appended section is the second `sae:`; the first is the tiny config's own.
    first = text.splitlines().index("sae:") + 1
    second = len(text.splitlines()) - 1
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert f"duplicate key 'sae' on line {second} (first on line {first})" in msg


def test_duplicated_nested_key(tmp_path):
    text = TINY.replace("  max_steps: 200\n", "  max_steps: 200\n  k: 16\n")
    lines = text.splitlines()
    first, second = lines.index("  k: 8") + 1, lines.index("  k: 16") + 1
    path = _write(tmp_path, text)
    with pytest.raises(
        ConfigError,
        match=rf"p\.yaml: duplicate key 'sae\.k' on line {second} \(first on line {first}\)",
    ):
        load_config(path)


def test_duplicate_in_an_included_section_file_names_that_file(tmp_path):
    model = (
        "id: org/Some-Model\n"
        "source: hub\n"
        "architecture: {n_layers: 24, d_model: 896}\n"
        "batch_size: 4\n"
        "activation_layers: [residuals_5]\n"
        "batch_size: 8\n"
    )
    included = _write(tmp_path, model, "models/m.yaml")
    project = _write(tmp_path, "data: {path: data}\nmodels: [models/m.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_config(project)
    assert str(e.value) == f"{included}: duplicate key 'batch_size' on line 6 (first on line 4)"


def test_duplicates_inside_lists_and_flow_mappings(tmp_path):
    path = _write(
        tmp_path, "models:\n  - id: a\n    generation: {max_new_tokens: 4, max_new_tokens: 8}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"duplicate key 'models\.0\.generation\.max_new_tokens' on line 3 \(first on line 3\)",
    ):
        read_yaml(path)


def test_merge_keys_may_be_overridden_and_distinct_keys_pass(tmp_path):
    path = _write(tmp_path, "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n'1': a\n1: b\n")
    assert read_yaml(path) == {
        "base": {"x": 1, "y": 2},
        "other": {"x": 3, "y": 2},
        "1": "a",
        1: "b",
    }


def test_loader_keeps_safe_load_semantics(tmp_path):
    assert issubclass(UniqueKeyLoader, yaml.SafeLoader)
    text = "a: 2026-01-01\nb: [1, 2.5, null, true]\nc: !!str 3\n"
    assert yaml.load(text, Loader=UniqueKeyLoader) == yaml.safe_load(text)
    path = _write(tmp_path, "data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_shipped_yaml_files_have_no_duplicate_keys(path):
    assert read_yaml(path) == yaml.safe_load(path.read_text())
