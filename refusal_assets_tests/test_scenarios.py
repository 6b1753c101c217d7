"""A researcher's week on the tiny config: what Dagster's automation requests after each change.

Every scenario starts from a copy of one real `refusal-assets run` of the tiny config (the shared
``shared_tiny_run`` fixture) and drives ``dg.evaluate_automation_conditions`` with its cursor, tick by
tick, as the daemon does; requested partitions are executed with the graph's wiring replica (see
``automation_world``) so a scenario takes seconds. The expected sets are exact, and each scenario
ends with nothing stale as the UI computes it. The README's table "what each change rebuilds"
is this file.
"""

from __future__ import annotations

import dagster as dg
import pytest

from refusal_assets.app import settings
from refusal_assets.defs.build import build_defs
from refusal_assets.defs.partitions import direction_partition_key, sae_partition_key
from refusal_assets_tests.automation_world import (
    requested,
    stale,
    tick_until_quiet,
    union,
    variant,
    wiring_replica,
)
from refusal_assets_tests.conftest import copy_tiny_run

A = "tiny-qwen2"
CATS = ["harassment", "illegal", "privacy", "violence"]
SITES = [f"{A}__resid1", f"{A}__resid2"]
A_FEATURES = {sae_partition_key(s) for s in SITES}  # features share the SAE's partitions


@pytest.fixture()
def week(shared_tiny_run, tiny_cfg, tmp_path):
    """(instance, cursor, storage) after the full run, with a first evaluation done."""
    base, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    instance = dg.DagsterInstance.from_config(str(settings.instance_home(base, tiny_cfg)))
    first = dg.evaluate_automation_conditions(defs=build_defs(tiny_cfg, storage), instance=instance)
    assert requested(first) == {}, "a full run leaves nothing for automation to do"
    yield instance, first.cursor, storage, base
    instance.dispose()


def _once_each(history: list[dict]) -> bool:
    """No partition was requested twice in one scenario (no double builds)."""
    return sum(len(v) for tick in history for v in tick.values()) == sum(
        len(v) for v in union(history).values()
    )


def test_full_run_nothing_requested_nothing_stale(tiny_cfg, week):
    instance, cursor, storage, _ = week
    defs = build_defs(tiny_cfg, storage)
    again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert requested(again) == {}
    assert stale(instance, list(defs.assets)) == {}


def test_add_model_b_requests_only_b(tiny_cfg, week):
    instance, cursor, storage, _ = week
    b = {**tiny_cfg.models[0].model_dump(), "id": "tiny-b", "key": "tiny-b"}
    cfg = variant(tiny_cfg, models=[tiny_cfg.models[0].model_dump(), b])
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    b_sites = ["tiny-b__resid1", "tiny-b__resid2"]
    # B's features read B's direction only: A's features stay current
    assert history == [
        {
            "refusal_behaviour": {f"{c}|tiny-b" for c in CATS},
            "activations": {f"{c}|{s}" for c in CATS for s in b_sites},
        },
        {
            "sae": {sae_partition_key(s) for s in b_sites},
            "refusal_direction": {direction_partition_key("tiny-b")},
        },
        {
            "features": {sae_partition_key(s) for s in b_sites},
            "circuit": {f"{c}|tiny-b" for c in CATS},
        },
        {"transfer": {"tiny-b"}, "comparison": {"tiny-b"}},
        {"report": {None}},
    ]
    assert stale(instance, list(defs.assets)) == {}


def test_edit_model_a_generation_requests_only_a_downstream(tiny_cfg, week):
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, models__0__generation={"max_new_tokens": 5})
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    # generation settings do not change activations, so neither they nor the SAEs rerun; the
    # direction is found anew once the new behaviour exists (never beside it, reading the old
    # files), and the feature cards show its cosines
    assert history == [
        {"refusal_behaviour": {f"{c}|{A}" for c in CATS}},
        {"refusal_direction": {direction_partition_key(A)}, "circuit": {f"{c}|{A}" for c in CATS}},
        {"features": A_FEATURES, "transfer": {A}, "comparison": {A}},
        {"report": {None}},
    ]
    assert stale(instance, list(defs.assets)) == {}


def test_edit_model_a_chat_template_rebuilds_each_partition_once(tiny_cfg, week):
    """A change that reaches both of a circuit's paths (behaviour and SAEs): each partition once."""
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, models__0__chat_template={"system_prompt": "You are careful."})
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    assert union(history) == {
        "refusal_behaviour": {f"{c}|{A}" for c in CATS},
        "activations": {f"{c}|{s}" for c in CATS for s in SITES},
        "sae": {sae_partition_key(s) for s in SITES},
        "features": A_FEATURES,
        "refusal_direction": {direction_partition_key(A)},
        "circuit": {f"{c}|{A}" for c in CATS},
        "transfer": {A},
        "comparison": {A},
        "report": {None},
    }
    assert _once_each(history), history
    assert stale(instance, list(defs.assets)) == {}


def test_add_category_requests_only_that_category(tiny_cfg, week):
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, data__categories=[*CATS, "hate"])
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    # a partition new to the partitions definition is "newly missing": eager builds it, root included
    assert history[0] == {"orbench_prompts": {"hate"}, "prompt_sample": {"hate"}}
    assert union(history) == {
        "orbench_prompts": {"hate"},
        "prompt_sample": {"hate"},
        "data_profile": {None},
        "refusal_behaviour": {f"hate|{A}"},
        "activations": {f"hate|{s}" for s in SITES},
        # the pooled direction reads every category, and the cards show its cosines
        "refusal_direction": {direction_partition_key(A)},
        "features": A_FEATURES,
        "circuit": {f"hate|{A}"},
        "transfer": {A},
        "comparison": {A},
        "report": {None},
    }, "the SAEs train on the pinned sae.train_categories: a new category does not retrain them"
    assert _once_each(history), history
    assert stale(instance, list(defs.assets)) == {}


@pytest.mark.parametrize("build_missing_roots", [False, True])
def test_fresh_instance_builds_itself_only_when_opted_in(tiny_cfg, tmp_path, build_missing_roots):
    """``automation.build_missing_roots``: off, a new instance waits for a first deliberate run;
    on, automation builds the whole graph from the roots."""
    cfg = variant(tiny_cfg, automation={"build_missing_roots": build_missing_roots})
    instance = dg.DagsterInstance.ephemeral()
    defs = build_defs(cfg, tmp_path / "storage")
    history, _ = tick_until_quiet(cfg, defs, instance, None, max_ticks=12)
    if not build_missing_roots:
        assert history == []
        return
    assert history[0] == {"orbench_prompts": set(CATS)}
    assert union(history)["circuit"] == {f"{c}|{A}" for c in CATS} and union(history)["report"] == {
        None
    }
    assert _once_each(history), history
    assert stale(instance, list(defs.assets)) == {}


def test_add_category_without_pinned_train_categories_retrains_the_saes(tiny_cfg, week):
    """The documented price of ``sae.train_categories: null``: SAEs read every category."""
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, data__categories=[*CATS, "hate"], sae__train_categories=None)
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    got = union(history)
    assert got["sae"] == {sae_partition_key(s) for s in SITES}
    assert got["circuit"] == {f"{c}|{A}" for c in [*CATS, "hate"]}


def test_add_layer_requests_the_new_site_then_that_models_circuits(tiny_cfg, week):
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, models__0__activation_layers=["residuals_1-3"])
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    assert history == [
        {"activations": {f"{c}|{A}__resid3" for c in CATS}},
        {
            "sae": {sae_partition_key(f"{A}__resid3")},
            "features": {sae_partition_key(f"{A}__resid3")},
        },
        {"circuit": {f"{c}|{A}" for c in CATS}},
        {"transfer": {A}, "comparison": {A}},
        {"report": {None}},
    ]
    assert stale(instance, list(defs.assets)) == {}


def test_edit_directions_rebuilds_direction_then_comparison_once(tiny_cfg, week):
    """The directions section is hashed by refusal_direction and by comparison (which carries its
    verdict): comparison waits for the new direction instead of building beside it."""
    instance, cursor, storage, _ = week
    cfg = variant(tiny_cfg, directions__max_new_tokens=6)
    defs = build_defs(cfg, storage)
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    assert history == [
        {"refusal_direction": {direction_partition_key(A)}},
        {"features": A_FEATURES, "comparison": {A}},
        {"report": {None}},
    ]
    assert stale(instance, list(defs.assets)) == {}


def test_thresholds_and_batch_sizes_retrain_nothing(tiny_cfg, week):
    instance, cursor, storage, _ = week
    cfg = variant(
        tiny_cfg,
        sae__thresholds={"max_fvu": 0.1, "max_dead_fraction": 0.1},
        models__0__batch_size=3,
        sae__splice={"prompts_per_category": 2, "batch_size": 3},
    )
    defs = build_defs(cfg, storage)
    assert (
        requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor))
        == {}
    )
    history, _ = tick_until_quiet(cfg, defs, instance, cursor)
    assert history == []
    assert stale(instance, list(defs.assets)) == {}


def test_switch_to_another_config_and_back_requests_nothing(tiny_cfg, week):
    """One instance per config name: another config (sharing every category and site key) is built
    in its own instance, and coming back finds tiny's exactly as it was."""
    instance, cursor, storage, base = week
    other = variant(
        tiny_cfg,
        name="tiny-alt",
        sae__k=6,
        models__0__generation={"max_new_tokens": 6},
        automation={"build_missing_roots": True},
    )
    other_home = settings.instance_home(base, other)
    assert other_home != settings.instance_home(base, tiny_cfg)
    other_home.mkdir(parents=True)
    other_instance = dg.DagsterInstance.from_config(str(other_home))
    other_defs = build_defs(other, storage.parent / "storage-alt")
    assets = wiring_replica(other_defs)
    history, other_cursor = tick_until_quiet(
        other, other_defs, other_instance, None, assets=assets, max_ticks=12
    )
    assert union(history)["comparison"] == {A}, "the other config builds fully in its own instance"
    # back to tiny: nothing requested, nothing stale
    defs = build_defs(tiny_cfg, storage)
    history, cursor = tick_until_quiet(tiny_cfg, defs, instance, cursor)
    assert history == []
    assert stale(instance, list(defs.assets)) == {}
    # and to the other again
    history, _ = tick_until_quiet(other, other_defs, other_instance, other_cursor, assets=assets)
    assert history == []
    other_instance.dispose()
