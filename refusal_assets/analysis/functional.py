"""The functional cross-category tests of one model as one procedure: circuit transfer and faithfulness
(each category's circuit ablated, or kept alone, on another's refusing prompts, against the baseline of
its complied-with safe prompts; :mod:`refusal_assets.analysis.transfer` holds the statistics). The
refusal directions are the execution level's own asset, ``refusal_direction``
(:mod:`refusal_assets.directions`).

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
class FunctionalSettings:
    """How the tests run: circuit selection, resampling, and the model's batches."""

    rule: VerdictRule
    selection: Mode
    k_per_site: int
    threshold: float
    n_bootstrap: int
    seed: int
    batch_size: int
    system_prompt: str | None = None
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class FunctionalTests:
    """What the functional tests say about one model; a test that could not run is None."""

    circuit_transfer: tr.CrossMatrix | None
    circuit_faithfulness: tr.CrossMatrix | None
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


def functional_tests(
    model,
    tokenizer,
    refusal_ids,
    saes: dict,
    circuits: dict[str, TransferCircuit],
    site_of_node: np.ndarray | None,
    settings: FunctionalSettings,
) -> FunctionalTests:
    """Every functional test of one model (see the module docstring). ``circuits``: the categories
    whose circuit enters the transfer test (two at least, or it does not run)."""
    t0 = time.perf_counter()
    transfer = faithfulness = None
    if len(circuits) >= 2:
        if site_of_node is None:
            raise ValueError("functional_tests: circuits given without site_of_node")
        transfer, faithfulness = _circuit_tests(
            model, tokenizer, refusal_ids, saes, circuits, site_of_node, settings
        )
    return FunctionalTests(
        circuit_transfer=transfer,
        circuit_faithfulness=faithfulness,
        circuit_seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------- inputs from the stored files


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
    tests = functional_tests(model, tokenizer, refusal_ids, saes, circuits, site_of_node, settings)
    return tests, fallback
