"""The functional cross-category tests of one model as one procedure: circuit transfer (each category's
circuit ablated on another's refusing prompts, against the baseline of its complied-with safe prompts),
direction selection on training prompts, and direction cross-ablation, induced refusal, the pooled
direction and direction cosines on held-out prompts (:mod:`refusal_assets.analysis.transfer` holds the
statistics of each).

:func:`functional_tests` is the procedure. The ``transfer`` asset feeds it from the stored sample,
behaviour and circuits (:func:`model_transfer`); ``refusal-assets calibrate`` feeds it a planted tiny
model whose answer is known (:func:`refusal_assets.analysis.calibration.calibrate_model`), so the
calibration checks the procedure the asset runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from refusal_assets.analysis import transfer as tr
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.circuits.ablation import ablated_scores
from refusal_assets.circuits.finding import baseline_prompts
from refusal_assets.circuits.passes import compute_baseline, prepare_suffixes
from refusal_assets.circuits.selection import Mode, select_circuit


@dataclass(frozen=True, kw_only=True)
class TransferCircuit:
    """One category's circuit as the transfer test uses it."""

    prompts: list[str]
    """The circuit's own prompts (the category's refusing toxic ones), scored with circuits ablated."""
    baseline_prompts: list[str]
    """Prompts whose mean activations are the ablation baseline (see :func:`baseline_prompts`)."""
    circuit: np.ndarray
    """[n_nodes] bool: the category's circuit."""
    effects: np.ndarray
    """[n_prompts, n_nodes]: per-prompt node effects, for the category's leave-one-out own circuits."""


@dataclass(frozen=True, kw_only=True)
class DirectionPrompts:
    """Per category: training prompts select each direction, held-out ones give every reported number."""

    toxic_train: dict[str, list[str]]
    harmless_train: dict[str, list[str]]
    toxic_eval: dict[str, list[str]]
    harmless_eval: dict[str, list[str]]


@dataclass(frozen=True, kw_only=True)
class FunctionalSettings:
    """How the tests run: circuit selection, resampling, direction candidates, and the model's batches."""

    rule: VerdictRule
    selection: Mode
    k_per_site: int
    threshold: float
    n_bootstrap: int
    n_permutations: int
    alpha: float
    seed: int
    direction_layers: int
    direction_positions: int
    pooled_selection_prompts: int
    batch_size: int
    system_prompt: str | None = None
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class FunctionalTests:
    """What the functional tests say about one model; a test that could not run is None."""

    circuit_transfer: tr.CrossMatrix | None
    circuit_faithfulness: tr.CrossMatrix | None
    directions: tr.DirectionTests | None
    cosine_tests: dict | None
    """Direction cosines at the pooled direction's layer and position (:func:`tr.direction_cosines`)."""
    circuit_seconds: float
    """Wall time of the circuit transfer."""

    def to_json(
        self, model_key: str, fallback: list[str], seconds: dict[str, float]
    ) -> dict[str, Any]:
        """``transfer.json``: ``fallback`` the categories left out, ``seconds`` the wall times."""
        out: dict[str, Any] = {"model": model_key, "enabled": True, "fallback_categories": fallback}
        if self.circuit_transfer is not None and self.circuit_faithfulness is not None:
            out["circuit_transfer"] = self.circuit_transfer.to_dict()
            out["circuit_faithfulness"] = self.circuit_faithfulness.to_dict()
        if self.directions is not None:
            out["directions"] = {**self.directions.to_dict(), "cosine_tests": self.cosine_tests}
        out["seconds"] = seconds
        return out


def _circuit_tests(
    model, tokenizer, refusal_ids, saes, circuits, site_of_node, settings: FunctionalSettings
):
    """Circuit transfer and faithfulness on B (:func:`tr.circuit_transfer`) over ``circuits``."""
    s = settings
    kw = {"batch_size": s.batch_size, "system_prompt": s.system_prompt, "device": s.device}

    def select(mean: np.ndarray) -> np.ndarray:
        return select_circuit(
            mean, site_of_node, mode=s.selection, k_per_site=s.k_per_site, threshold=s.threshold
        )

    score_fns, own = {}, {}
    for c, inputs in circuits.items():
        baseline = compute_baseline(model, tokenizer, inputs.baseline_prompts, saes, **kw)
        suffixes = prepare_suffixes(model, tokenizer, inputs.prompts, **kw)
        score_fns[c] = lambda keep, sx=suffixes, b=baseline: ablated_scores(
            model, sx, saes, b, keep, refusal_ids
        )
        own[c] = tr.loo_masks(inputs.effects, select)
    masks = {c: inputs.circuit for c, inputs in circuits.items()}
    return tr.circuit_transfer(
        score_fns, masks, own, site_of_node, s.rule, n_bootstrap=s.n_bootstrap, seed=s.seed
    )


def _direction_tests(
    model, tokenizer, refusal_ids, prompts: DirectionPrompts, settings: FunctionalSettings
):
    """Directions selected on the training prompts, tested on the held-out ones, and their cosines."""
    s = settings
    kw = {"batch_size": s.batch_size, "system_prompt": s.system_prompt, "device": s.device}
    hidden: dict = {}
    selected = tr.select_directions(
        model,
        tokenizer,
        prompts.toxic_train,
        prompts.harmless_train,
        refusal_ids,
        n_layer_candidates=s.direction_layers,
        n_position_candidates=s.direction_positions,
        pooled_selection_prompts=s.pooled_selection_prompts,
        hidden=hidden,
        **kw,
    )
    tests = tr.direction_tests(
        model,
        tokenizer,
        selected,
        prompts.toxic_eval,
        prompts.harmless_eval,
        refusal_ids,
        s.rule,
        n_bootstrap=s.n_bootstrap,
        seed=s.seed,
        **kw,
    )
    # cosines at the pooled direction's layer and position, with ceiling and null
    layer, pos = selected["pooled"].layer, selected["pooled"].position
    cosines = tr.direction_cosines(
        {c: h[:, layer, pos].numpy() for c, h in hidden["toxic"].items()},
        {c: h[:, layer, pos].numpy() for c, h in hidden["harmless"].items()},
        n_permutations=s.n_permutations,
        alpha=s.alpha,
        seed=s.seed,
    )
    return tests, {"layer": layer, "position": pos, **cosines}


def functional_tests(
    model,
    tokenizer,
    refusal_ids,
    saes: dict,
    circuits: dict[str, TransferCircuit],
    site_of_node: np.ndarray | None,
    directions: DirectionPrompts,
    settings: FunctionalSettings,
) -> FunctionalTests:
    """Every functional test of one model (see the module docstring). ``circuits``: the categories
    whose circuit enters the transfer test (two at least, or it does not run); ``directions``: the
    categories with training prompts of both kinds enter the direction tests (two at least)."""
    t0 = time.perf_counter()
    transfer = faithfulness = None
    if len(circuits) >= 2:
        if site_of_node is None:
            raise ValueError("functional_tests: circuits given without site_of_node")
        transfer, faithfulness = _circuit_tests(
            model, tokenizer, refusal_ids, saes, circuits, site_of_node, settings
        )
    circuit_seconds = time.perf_counter() - t0
    tests = cosine_tests = None
    if len(directions.toxic_train) >= 2:
        tests, cosine_tests = _direction_tests(model, tokenizer, refusal_ids, directions, settings)
    return FunctionalTests(
        circuit_transfer=transfer,
        circuit_faithfulness=faithfulness,
        directions=tests,
        cosine_tests=cosine_tests,
        circuit_seconds=circuit_seconds,
    )


# --------------------------------------------------------------- inputs from the stored files


def _refusing(rows: pl.DataFrame, prompt_filter: str) -> pl.DataFrame:
    if prompt_filter == "all":
        return rows
    return rows.filter(
        pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") > 0
    )


def category_circuit(
    summary: dict, tensors: dict[str, np.ndarray], sample: pl.DataFrame, prompt_filter: str
) -> TransferCircuit | None:
    """A category's transfer inputs from its ``circuit.json``, effects and sample joined with its
    behaviour; None where its circuit could not use ``prompt_filter`` (it mixes refused and
    complied prompts, so it stays out of the test)."""
    group = summary["groups"].get("toxic") or summary["groups"].get("all")
    key = "toxic" if "toxic" in summary["groups"] else "all"
    if group is None or group.get("prompt_set", prompt_filter) != prompt_filter:
        return None
    by_id = dict(zip(sample["prompt_id"].to_list(), sample["prompt"].to_list()))
    mask = np.zeros(len(tensors["site_of_node"]), bool)
    mask[[n["node"] for n in group["nodes"]]] = True
    return TransferCircuit(
        prompts=[by_id[p] for p in group["prompt_ids"]],
        baseline_prompts=baseline_prompts(sample, prompt_filter)[0],
        circuit=mask,
        effects=tensors[f"effects_{key}"],
    )


def direction_prompts(
    samples: dict[str, pl.DataFrame], fallback: list[str], prompt_filter: str
) -> DirectionPrompts:
    """Training (``heldout`` False) and held-out prompts per category from its sample joined with its
    behaviour; held-out toxic ones only where the model refuses (``prompt_filter``); categories in
    ``fallback`` and those without training prompts of both kinds select no direction."""

    def prompts_of(c: str, split: str, heldout: bool, refusing: bool = False) -> list[str]:
        rows = samples[c].filter((pl.col("split") == split) & (pl.col("heldout") == heldout))
        return (_refusing(rows, prompt_filter) if refusing else rows)["prompt"].to_list()

    toxic_train = {c: prompts_of(c, "toxic", False) for c in samples}
    harmless_train = {c: prompts_of(c, "safe", False) for c in samples}
    usable = [c for c, p in toxic_train.items() if p and harmless_train[c] and c not in fallback]
    return DirectionPrompts(
        toxic_train={c: toxic_train[c] for c in usable},
        harmless_train={c: harmless_train[c] for c in usable},
        toxic_eval={
            c: prompts_of(c, "toxic", True, refusing=True) for c in samples if c not in fallback
        },
        harmless_eval={c: prompts_of(c, "safe", True) for c in samples},
    )


def model_transfer(
    model,
    tokenizer,
    refusal_ids,
    saes: dict,
    circuit_files: dict[str, tuple[dict, dict[str, np.ndarray]]],
    samples: dict[str, pl.DataFrame],
    settings: FunctionalSettings,
    prompt_filter: str,
) -> tuple[FunctionalTests, list[str]]:
    """The ``transfer`` asset's procedure: :func:`functional_tests` on the inputs read from the stored
    circuits (``circuit_files``: category -> (``circuit.json``, tensors)) and samples joined with
    behaviour. Returns the tests and the categories left out (their circuits fell back)."""
    circuits, fallback, site_of_node = {}, [], None
    for c, (summary, tensors) in circuit_files.items():
        inputs = category_circuit(summary, tensors, samples[c], prompt_filter)
        if inputs is None:
            fallback.append(c)  # mixed refused and complied prompts: out of the test
            continue
        circuits[c], site_of_node = inputs, tensors["site_of_node"]
    prompts = direction_prompts(samples, fallback, prompt_filter)
    tests = functional_tests(
        model, tokenizer, refusal_ids, saes, circuits, site_of_node, prompts, settings
    )
    return tests, fallback
