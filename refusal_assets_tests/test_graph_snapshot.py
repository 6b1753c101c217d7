"""The asset graph, frozen: keys, partitions, dependencies with their partition mappings, groups,
kinds, pools, automation and checks. A refactor that changes any of them fails here.

After an intended change, regenerate the snapshot and review its diff:

    REFUSAL_ASSETS_UPDATE_SNAPSHOT=1 python -m pytest -q refusal_assets_tests/test_graph_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from refusal_assets.config import load_config
from refusal_assets.defs.build import build_defs

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_DIR = Path(__file__).resolve().parent / "snapshots"
CONFIGS = ["tiny", "default"]


def _partitions(pdef: dg.PartitionsDefinition | None) -> object:
    if pdef is None:
        return None
    if isinstance(pdef, dg.MultiPartitionsDefinition):
        return {"multi": {d.name: _partitions(d.partitions_def) for d in pdef.partitions_defs}}
    return {type(pdef).__name__: list(pdef.get_partition_keys())}


def _mapping(mapping: object) -> object:
    """A partition mapping as data: its class and its own fields (nested mappings too)."""
    if mapping is None:
        return None
    if isinstance(mapping, dg.MultiPartitionMapping):
        return {
            "MultiPartitionMapping": {
                up: {
                    "downstream_dimension": m.dimension_name,
                    "mapping": _mapping(m.partition_mapping),
                }
                for up, m in sorted(mapping.downstream_mappings_by_upstream_dimension.items())
            }
        }
    if isinstance(mapping, dg.StaticPartitionMapping):
        return {
            "StaticPartitionMapping": {
                k: sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in sorted(mapping._mapping.items())
            }
        }
    if isinstance(mapping, dg.MultiToSingleDimensionPartitionMapping):
        return {"MultiToSingleDimensionPartitionMapping": mapping.partition_dimension_name}
    return type(mapping).__name__


def graph_snapshot(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    out: dict = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        spec = next(s for s in node.assets_def.specs if s.key == key)
        deps = {}
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            deps[parent.to_user_string()] = _mapping(
                node.assets_def.get_partition_mapping_for_dep(parent)
                if node.assets_def.partitions_def is not None
                else None
            )
        automation = spec.automation_condition
        out[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "partitions": _partitions(node.partitions_def),
            "deps": deps,
            "pools": sorted(p for p in node.assets_def.node_def.pools)
            if hasattr(node.assets_def.node_def, "pools")
            else [],
            "op_tags": dict(sorted((node.assets_def.node_def.tags or {}).items())),
            "automation": automation.get_label() or type(automation).__name__
            if automation is not None
            else None,
            "checks": sorted(c.name for c in node.assets_def.check_specs),
        }
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_asset_graph_matches_snapshot(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    got = graph_snapshot(build_defs(cfg, ROOT / "storage" / "unused"))
    path = SNAPSHOT_DIR / f"asset_graph_{name}.json"
    if os.environ.get("REFUSAL_ASSETS_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), (
        f"{path} missing; regenerate with REFUSAL_ASSETS_UPDATE_SNAPSHOT=1 (see module docstring)"
    )
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want), "asset keys changed"
    for key in want:
        assert got[key] == want[key], f"asset {key} changed"


def test_snapshot_notices_a_changed_mapping(tiny_cfg):
    """The snapshot is sensitive to what it claims to freeze: a dependency with another mapping differs."""
    snap = graph_snapshot(build_defs(tiny_cfg, ROOT / "storage" / "unused"))
    # exact mappings: a model's circuits read that model's SAEs; SAEs read the training categories
    assert snap["circuit"]["deps"]["sae"]["MultiPartitionMapping"]["site"] == {
        "downstream_dimension": "model",
        "mapping": {
            "StaticPartitionMapping": {
                "tiny-qwen2__resid1": ["tiny-qwen2"],
                "tiny-qwen2__resid2": ["tiny-qwen2"],
            }
        },
    }
    assert (
        snap["sae"]["deps"]["activations"]["MultiPartitionMapping"]["category"][
            "downstream_dimension"
        ]
        == "scope"
    )
    assert snap["refusal_behaviour"]["deps"]["model_config"] == {
        "MultiToSingleDimensionPartitionMapping": "model"
    }
    assert snap["activations"]["pools"] == ["gpu"] and snap["comparison"]["pools"] == []
    assert snap["circuit"]["automation"] is not None
