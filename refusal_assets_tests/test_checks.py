"""The WARN asset checks as Dagster runs them: each reads constructed files of one partition through
the layout and warns (severity WARN, never blocking) on the weak one, passes on the sound one."""

import json

import dagster as dg
import polars as pl
import pytest
import torch

from refusal_assets.defs import checks
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.layout import Layout
from refusal_assets.storage import write_parquet, write_safetensors, write_text

CATS = ["harassment", "violence"]  # harassment: the weak partition, violence: the sound one


@pytest.fixture()
def setup(tiny_cfg, tmp_path):
    # two of the tiny config's categories: its SAEs then train on both (train_categories pins all four)
    tiny_cfg = tiny_cfg.model_copy(
        update={"sae": tiny_cfg.sae.model_copy(update={"train_categories": None})}
    )
    parts = Partitions.build(tiny_cfg, CATS)
    defs = {next(iter(c.check_keys)).name: c for c in checks.build(tiny_cfg, parts)}
    return tiny_cfg, parts, defs, Layout(tmp_path), tmp_path


def _run(
    asset: str, pdef: dg.PartitionsDefinition, key, check_defs: list, root
) -> dict[str, dg.AssetCheckEvaluation]:
    """Materialize a no-op stand-in for ``asset`` (the files are already there) with its checks."""

    @dg.asset(name=asset, partitions_def=pdef)
    def stand_in() -> None:
        return None

    result = dg.materialize(
        [stand_in, *check_defs],
        partition_key=key,
        resources={"storage": StorageResource(root=str(root))},
    )
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _group(
    *, denominator_ci, advantage_ci, n_used, prompt_set, faithfulness=0.8, random=0.1
) -> dict:
    return {
        "n_prompts": n_used,
        "n_prompts_in_group": 8,
        "prompt_set": prompt_set,
        "faithfulness": faithfulness,
        "faithfulness_ci": [faithfulness - 0.2, faithfulness + 0.2],
        "random_faithfulness": random,
        "advantage_ci": advantage_ci,
        "sweep": {"m_full": 1.0, "m_empty": 0.0, "denominator_ci": denominator_ci},
    }


def _write_circuit(layout: Layout, model: str, category: str, groups: dict) -> None:
    write_safetensors(
        {"site_of_node": torch.zeros(3, dtype=torch.int32)}, layout.circuit_tensors(model, category)
    )
    write_text(
        json.dumps({"category": category, "model": model, "groups": groups}),
        layout.circuit_summary(model, category),
    )


def test_circuit_checks_warn_on_a_weak_circuit_and_pass_a_sound_one(setup):
    cfg, parts, defs, layout, root = setup
    model = cfg.models[0].model_key
    weak = _group(
        denominator_ci=[-0.1, 0.3],
        advantage_ci=[-0.2, 0.4],
        n_used=8,
        prompt_set="all (score_positive: only 1 < 2)",
    )
    sound = _group(
        denominator_ci=[0.8, 1.2], advantage_ci=[0.3, 0.9], n_used=5, prompt_set="score_positive"
    )
    _write_circuit(layout, model, "harassment", {"toxic": weak, "benign": sound})
    _write_circuit(layout, model, "violence", {"toxic": sound, "benign": sound})
    names = ["denominator_ci_excludes_zero", "faithfulness_above_random", "enough_prompts"]
    for category, passed in (("harassment", False), ("violence", True)):
        key = dg.MultiPartitionKey({"model": model, "category": category})
        evals = _run("circuit", parts.model_category, key, [defs[n] for n in names], root)
        assert sorted(evals) == sorted(names)
        for name, e in evals.items():
            assert e.passed is passed, (name, e.metadata["why"])
            assert e.severity == dg.AssetCheckSeverity.WARN and e.partition == key
    # metadata says why, for the weak group only, with the numbers as floats
    evals = _run(
        "circuit",
        parts.model_category,
        dg.MultiPartitionKey({"model": model, "category": "harassment"}),
        [defs[n] for n in names],
        root,
    )
    assert (
        evals["denominator_ci_excludes_zero"]
        .metadata["why"]
        .value.startswith("toxic: m(M) - m(∅) = 1.000, 95% CI [-0.100, 0.300] includes 0")
    )
    assert evals["denominator_ci_excludes_zero"].metadata["toxic_ci_lo"].value == -0.1
    assert (
        "the circuit is no better than a random one"
        in evals["faithfulness_above_random"].metadata["why"].value
    )
    assert (
        "only 1 < 2" in evals["enough_prompts"].metadata["why"].value
        and "benign" not in evals["enough_prompts"].metadata["why"].value
    )


def test_behaviour_check_warns_when_safe_prompts_are_refused_as_often(setup):
    cfg, parts, defs, layout, root = setup
    model = cfg.models[0].model_key
    for category, toxic_refused in (
        ("harassment", [True, False, False, False]),
        ("violence", [True, True, True, False]),
    ):
        df = pl.DataFrame(
            {
                "split": ["toxic"] * 4 + ["safe"] * 4,
                "refused": toxic_refused + [True, False, False, False],
                "p_refusal": [0.5] * 8,
                "refusal_score": [0.0] * 8,
            }
        )
        write_parquet(df.to_arrow(), layout.behaviour(model, category))
    results = {}
    for category in CATS:
        key = dg.MultiPartitionKey({"model": model, "category": category})
        results[category] = _run(
            "refusal_behaviour",
            parts.model_category,
            key,
            [defs["toxic_refused_more_than_safe"]],
            root,
        )["toxic_refused_more_than_safe"]
    weak, sound = results["harassment"], results["violence"]
    assert not weak.passed and weak.severity == dg.AssetCheckSeverity.WARN
    assert (
        weak.metadata["refusal_rate_toxic"].value == 0.25
        and weak.metadata["refusal_rate_safe"].value == 0.25
    )
    assert "at least as often" in weak.metadata["why"].value
    assert sound.passed and sound.metadata["refusal_rate_toxic"].value == 0.75
    assert (
        0
        < sound.metadata["refusal_rate_toxic_ci_lo"].value
        < 0.75
        < sound.metadata["refusal_rate_toxic_ci_hi"].value
        < 1
    )


@pytest.mark.parametrize(
    "groups,passed",
    [
        ({"toxic": {"categories": ["harassment"]}, "benign": {"categories": CATS}}, False),
        ({"toxic": {"categories": CATS}}, False),  # benign was not compared at all
        ({"toxic": {"categories": CATS}, "benign": {"categories": CATS}}, True),
    ],
)
def test_comparison_check_warns_below_two_categories(setup, groups, passed):
    cfg, parts, defs, layout, root = setup
    model = cfg.models[0].model_key
    write_text(
        json.dumps({"model": model, "categories": CATS, "groups": groups}),
        layout.comparison_summary(model),
    )
    e = _run("comparison", parts.model, model, [defs["enough_categories"]], root)[
        "enough_categories"
    ]
    assert e.passed is passed and e.severity == dg.AssetCheckSeverity.WARN
    assert (
        e.metadata["why"].value == "every prompt group compares at least 2 categories."
    ) is passed


def test_checks_are_registered_non_blocking_on_their_assets(tiny_cfg, tmp_path):
    from refusal_assets.defs.build import build_defs

    defs = build_defs(tiny_cfg, tmp_path)
    graph = defs.resolve_asset_graph()
    keys = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert {
        ("circuit", "denominator_ci_excludes_zero"),
        ("circuit", "faithfulness_above_random"),
        ("circuit", "enough_prompts"),
        ("refusal_behaviour", "toxic_refused_more_than_safe"),
        ("comparison", "enough_categories"),
    } <= keys
    assert not any(c.blocking for d in defs.asset_checks for c in d.check_specs)
