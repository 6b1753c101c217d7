"""Calibration of the comparison on planted answers (``refusal-assets calibrate --json``).

Synthetic per-prompt node effects with a known answer: ``monolithic`` (every category draws its
prompts from one mechanism: the same latent means) and ``modular`` (each category its own disjoint
latents). Latent strengths follow a decaying spectrum, so the top-k boundary is noisy and the
statistics vary from replicate to replicate; that is what makes CI coverage measurable.

Coverage of a CI statistic = the share of (replicate, pair) CIs that contain the statistic's
expectation at this sample size, estimated by the mean of its point estimates over the replicates
(the quantity a replicate's CI is an interval for). The normalised Jaccard's expectation under
identical categories must be ~1 (numerator and ceiling at the same size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from refusal_assets.analysis.overlap import compare_categories
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.directions.planted import FILLER_WORDS, wire_attention_copy

Planted = Literal["monolithic", "modular"]
CI_STATS = ("jaccard", "normalised_jaccard", "shared_fraction")


@dataclass(frozen=True, kw_only=True)
class SyntheticDesign:
    """Sizes of one synthetic comparison (defaults: the default config's per-category sample)."""

    n_categories: int = 4
    n_prompts: int = 14
    n_sites: int = 2
    n_latents: int = 64
    n_strong: int = 12
    """Latents per site that carry a category's mechanism (the spectrum decays over them)."""
    k_per_site: int = 8
    noise: float = 0.2
    """Per-prompt noise sd, relative to the strongest latent's mean effect (1.0)."""


def planted_effects(
    planted: Planted, design: SyntheticDesign, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Per category ``[n_prompts, n_sites * n_latents]`` effects of the planted mechanism."""
    spectrum = np.exp(
        -np.arange(design.n_strong) / 4.0
    )  # 1, 0.78, 0.61, ...: a noisy top-k boundary
    out = {}
    for c in range(design.n_categories):
        start = 0 if planted == "monolithic" else c * design.n_strong
        if start + design.n_strong > design.n_latents:
            raise ValueError(
                f"modular design needs n_latents >= n_categories * n_strong = {design.n_categories * design.n_strong}"
            )
        mean = np.zeros((design.n_sites, design.n_latents))
        mean[:, start : start + design.n_strong] = spectrum
        out[f"cat{c}"] = mean.ravel() + rng.normal(0.0, design.noise, (design.n_prompts, mean.size))
    return out


@dataclass(frozen=True, kw_only=True)
class PlantedRun:
    planted: Planted
    n_replicates: int
    verdicts: dict[str, int]
    """Verdict -> replicates."""
    correct_fraction: float
    coverage: dict[str, float]
    """CI statistic -> share of CIs that contain its expectation."""
    expectation: dict[str, float]
    """CI statistic -> mean point estimate over replicates and pairs."""
    estimate_inside_ci: bool
    """Every point estimate lies inside its own CI."""


@dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    design: SyntheticDesign
    runs: list[PlantedRun]
    normalised_expectation_identical: float
    """Mean normalised Jaccard under identical categories (the monolithic plant): should be ~1."""
    params: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (
            all(r.correct_fraction >= 0.9 for r in self.runs)
            and all(v >= 0.9 for r in self.runs for v in r.coverage.values() if math.isfinite(v))
            and all(r.estimate_inside_ci for r in self.runs)
            and abs(self.normalised_expectation_identical - 1) <= 0.1
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _pair_values(result, stat: str) -> list[tuple[float, float, float]]:
    if stat == "shared_fraction":
        return [(result.shared_fraction, *result.shared_fraction_ci)]
    return [(getattr(p, stat), *getattr(p, f"{stat}_ci")) for p in result.pairs]


def run_planted(
    planted: Planted,
    design: SyntheticDesign,
    *,
    n_replicates: int,
    n_permutations: int,
    n_bootstrap: int,
    seed: int = 0,
    rule: VerdictRule | None = None,
) -> tuple[PlantedRun, list]:
    """``n_replicates`` fresh samples of one planted answer, each through the full comparison."""
    rule = rule or VerdictRule()
    site_of_node = np.repeat(np.arange(design.n_sites), design.n_latents)
    values: dict[str, list[tuple[float, float, float]]] = {s: [] for s in CI_STATS}
    verdicts: dict[str, int] = {}
    for r in range(n_replicates):
        rng = np.random.default_rng(
            np.random.SeedSequence(seed, spawn_key=(0 if planted == "monolithic" else 1, r))
        )
        result = compare_categories(
            planted_effects(planted, design, rng),
            site_of_node,
            mode="topk",
            k_per_site=design.k_per_site,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            seed=seed + r,
            rule=rule,
        )
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
        for s in CI_STATS:
            values[s].extend(_pair_values(result, s))
    coverage, expectation, inside = {}, {}, True
    for s, rows in values.items():
        arr = np.array(rows, dtype=float)  # [n, 3]: estimate, lo, hi
        ok = np.isfinite(arr).all(axis=1)
        arr = arr[ok]
        if not len(arr):
            coverage[s] = expectation[s] = math.nan
            continue
        truth = float(arr[:, 0].mean())
        expectation[s] = truth
        coverage[s] = float(((arr[:, 1] <= truth + 1e-12) & (truth - 1e-12 <= arr[:, 2])).mean())
        inside &= bool(((arr[:, 1] <= arr[:, 0] + 1e-12) & (arr[:, 0] <= arr[:, 2] + 1e-12)).all())
    return PlantedRun(
        planted=planted,
        n_replicates=n_replicates,
        verdicts=verdicts,
        correct_fraction=verdicts.get(planted, 0) / n_replicates,
        coverage=coverage,
        expectation=expectation,
        estimate_inside_ci=inside,
    ), values["normalised_jaccard"]


def calibrate_synthetic(
    design: SyntheticDesign = SyntheticDesign(),
    *,
    n_replicates: int = 200,
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    seed: int = 0,
    rule: VerdictRule | None = None,
) -> CalibrationReport:
    """Both planted answers at ``design``'s sizes; see the module docstring for what is measured."""
    rule = rule or VerdictRule()
    runs, norm_identical = [], math.nan
    for planted in ("monolithic", "modular"):
        run, norm = run_planted(
            planted,
            design,
            n_replicates=n_replicates,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            seed=seed,
            rule=rule,
        )
        runs.append(run)
        if planted == "monolithic":
            est = np.array([v[0] for v in norm], dtype=float)
            norm_identical = float(np.nanmean(est)) if np.isfinite(est).any() else math.nan
    return CalibrationReport(
        design=design,
        runs=runs,
        normalised_expectation_identical=norm_identical,
        params=dict(
            n_replicates=n_replicates,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            seed=seed,
            **asdict(rule),
        ),
    )


def design_from_config(cfg) -> SyntheticDesign:
    """The default design at the config's per-category sample size (toxic prompts per category)."""
    return SyntheticDesign(n_prompts=int(cfg.data.sampling.max_per_cell))


def planted_worlds_report(features, *, n_replicates: int, seed: int) -> dict:
    """The ``worlds`` and ``tests`` blocks: the tiny model's three planted worlds
    (:mod:`refusal_assets.analysis.tiny_worlds`) at the real per-category counts, each recovered at
    both levels ``n_replicates`` times, and each test's power, false-answer rate and vote (the
    synthetic feature-level plant from ``features``, >= 50 replicates; the tiny model's two)."""
    from refusal_assets.analysis import tiny_worlds as tw
    from refusal_assets.analysis.feature_calibration import REAL_COUNTS
    from refusal_assets.config import load_config
    from refusal_assets.lm.models import load_model

    tiny = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    model, tok = load_model(tiny.models[0], tiny.resolve, "cpu", log=lambda s: None)
    runs = tw.calibrate_tiny_worlds(
        model, tok, tiny.models[0], REAL_COUNTS, n_replicates=n_replicates, seed=seed
    )
    worlds = {
        w: {
            "execution": tw.majority(r.execution),
            "features": tw.majority(r.features),
            "execution_replicates": r.execution,
            "features_replicates": r.features,
            "core_share_replicates": r.core_share,
            "expected_execution": tw.EXPECTED_EXECUTION[w],
            "expected_features": tw.EXPECTED_FEATURES[w],
        }
        for w, r in runs.items()
    }
    synthetic = {w: v.features for w, v in features.worlds.items()}
    tests = {
        "features_synthetic": tw.TestRates(
            planted={w: f.planted_answer for w, f in synthetic.items()},
            power={w: f.power for w, f in synthetic.items()},
            false_answer_rate={w: f.false_answer_rate for w, f in synthetic.items()},
            n_replicates=features.n_replicates,
        ).to_dict(),
        "features_tiny_model": tw.rates_of(
            {w: r.features for w, r in runs.items()}, tw.EXPECTED_FEATURES
        ).to_dict(),
        "execution_tiny_model": tw.rates_of(
            {w: r.execution for w, r in runs.items()}, tw.EXPECTED_EXECUTION
        ).to_dict(),
    }
    return {"worlds": worlds, "tests": tests, "counts": dict(REAL_COUNTS)}


def worlds_passed(report: dict) -> bool:
    """Issue 26's done-when: every voting test's false-answer rate <= 0.10 (a test over it does
    not vote); two_level -> execution monolithic, features not monolithic; monolithic and modular
    right at both levels."""
    from refusal_assets.analysis.feature_calibration import MAX_FALSE_ANSWER_RATE

    w = report["worlds"]
    voting_ok = all(
        max(t["false_answer_rate"].values()) <= MAX_FALSE_ANSWER_RATE
        for t in report["tests"].values()
        if t["votes"]
    )
    right = all(
        w[name]["execution"] == name and w[name]["features"] == name
        for name in ("monolithic", "modular")
    )
    two = w["two_level"]
    return (
        voting_ok and right and two["execution"] == "monolithic" and two["features"] != "monolithic"
    )


def run_calibrate(cfg, *, as_json: bool, n_replicates: int, model_level: bool = True) -> int:
    """``refusal-assets calibrate``: the synthetic levels at the config's sample sizes and the tiny
    model's planted worlds; prints answers, rates and votes; exit 0 when the worlds are recovered
    (:func:`worlds_passed`) and the synthetic feature-level test votes, 1 otherwise."""
    import json

    comp = cfg.comparison
    rule = VerdictRule.from_config(comp)
    design = design_from_config(cfg)
    report = calibrate_synthetic(
        design,
        n_replicates=n_replicates,
        n_permutations=min(comp.n_permutations, 200),
        n_bootstrap=min(comp.n_bootstrap, 200),
        seed=comp.seed,
        rule=rule,
    )
    # the overlap test's synthetic check: reported, not part of `passed` (it no longer votes)
    out: dict = {"synthetic": report.to_dict()}
    from refusal_assets.analysis.feature_calibration import calibrate_feature_level

    features = calibrate_feature_level(n_replicates=max(50, n_replicates), seed=comp.seed)
    out["feature_level"] = features.to_dict()
    passed = features.votes
    if model_level:
        out |= planted_worlds_report(features, n_replicates=3, seed=comp.seed)
        passed &= worlds_passed(out)
    out["passed"] = passed
    if as_json:
        print(json.dumps(out, default=float))
        return 0 if passed else 1
    for world, w in out.get("worlds", {}).items():
        print(f"planted {world}: execution {w['execution']}, features {w['features']}")
    for name, t in out.get("tests", {}).items():
        print(
            f"{name}: votes {t['votes']}, power {t['power']}, "
            f"false-answer rate {t['false_answer_rate']}"
        )
    print(f"passed: {passed}")
    return 0 if passed else 1


# ------------------------------------------------------------------ level 2: a tiny planted model


@dataclass(frozen=True, kw_only=True)
class ModelCalibration:
    planted: Planted
    overlap: str
    circuit_transfer: str
    combined: str
    reasons: dict[str, str]


def planted_model(
    model, tokenizer, planted: Planted, n_categories: int, *, alpha: float = 6.0, beta: float = 8.0
):
    """A copy of a tiny Qwen2-style model whose refusal is a planted mechanism, and its marker tokens.

    MLPs are off; attention is off except in block 0, where zero queries and keys give uniform causal
    attention and the values copy the first 32 residual dimensions, so every post-instruction position
    carries the mean of the prompt's earlier embeddings there. Ordinary tokens have nothing in those
    dimensions; the marker token ``<catC>`` that opens category C's toxic prompts carries
    ``alpha * e_m``: ``m = 0`` for every category (``monolithic``: one shared mechanism) or ``m = C``
    (``modular``: disjoint ones). The refusal logits read ``beta * sum_m e_m`` after the final norm.
    Returns (model, tokenizer, markers, refusal_ids)."""
    import copy

    import torch

    model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    markers = [f"<cat{c}>" for c in range(n_categories)]
    tokenizer.add_tokens(markers, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    d = model.config.hidden_size
    if d < 64 or n_categories + 1 > 32:
        raise ValueError(
            f"planted_model needs d_model >= 64 and at most 31 categories (d_model {d}, {n_categories} categories)"
        )
    head = model.config.hidden_size // model.config.num_attention_heads
    n_kv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // n_kv
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.mlp.down_proj.weight.zero_()
            if i > 0:  # only the first block's attention copies; later ones write nothing
                block.self_attn.o_proj.weight.zero_()
                continue
            wire_attention_copy(block.self_attn, head, n_kv, group)
            block.input_layernorm.weight.fill_(1.0)
        emb = model.get_input_embeddings().weight
        width = n_kv * head  # the dimensions the attention copies
        emb[:, :width] = 0.0
        ids = [tokenizer.convert_tokens_to_ids(m) for m in markers]
        for c, tid in enumerate(ids):
            emb[tid, 0 if planted == "monolithic" else c] = alpha
        model.model.norm.weight.fill_(1.0)
        refusal_ids = torch.tensor(
            sorted(set(tokenizer.encode(" Sorry", add_special_tokens=False)[:1]))
        )
        readout = torch.zeros(d)
        readout[: (1 if planted == "monolithic" else n_categories)] = beta
        model.lm_head.weight[refusal_ids] = readout
    return model.eval(), tokenizer, markers, refusal_ids


def planted_prompts(
    markers: list[str], n_prompts: int, rng: np.random.Generator
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(toxic, harmless) prompts per category ``cat0..``: random filler words, the toxic ones led by
    their category's marker token."""

    def text(marker: str = "") -> str:
        body = " ".join(rng.choice(FILLER_WORDS, size=int(rng.integers(3, 9))))
        return f"{marker} {body}".strip()

    cats = [f"cat{c}" for c in range(len(markers))]
    toxic = {c: [text(markers[i]) for _ in range(n_prompts)] for i, c in enumerate(cats)}
    harmless = {c: [text() for _ in range(n_prompts)] for c in cats}
    return toxic, harmless


def _identity_saes(d_model: int):
    """One identity SAE (every latent one residual dimension) at the planted model's layer-1 residual."""
    import torch

    from refusal_assets.circuits.selection import NodeIndex
    from refusal_assets.lm.sites import Site
    from refusal_assets.sae.model import TopKSAE

    site = Site(1, "resid")
    sae = TopKSAE(d_model, d_model, k=d_model)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(d_model))
        sae.W_enc.copy_(torch.eye(d_model))
    return {site: sae.eval()}, NodeIndex([site], [d_model])


def calibrate_model(
    model,
    tokenizer,
    planted: Planted,
    *,
    n_categories: int = 4,
    n_prompts: int = 14,
    n_bootstrap: int = 100,
    n_permutations: int = 100,
    seed: int = 0,
    rule: VerdictRule | None = None,
) -> ModelCalibration:
    """Every test of the comparison on a planted tiny model (:func:`planted_model`): node effects by
    attribution patching, circuit overlap, and the functional tests through the procedure the
    ``transfer`` asset runs (:func:`refusal_assets.analysis.functional.functional_tests`), and the
    combined verdict."""
    from refusal_assets.analysis import functional as fn
    from refusal_assets.analysis.verdict import combine, overlap_line, transfer_lines
    from refusal_assets.circuits.attribution import node_effects
    from refusal_assets.circuits.passes import compute_baseline
    from refusal_assets.circuits.selection import select_circuit

    rule = rule or VerdictRule()
    m, tok, markers, ids = planted_model(model, tokenizer, planted, n_categories)
    toxic, harmless = planted_prompts(markers, n_prompts, np.random.default_rng(seed))
    saes, index = _identity_saes(m.config.hidden_size)
    settings = fn.FunctionalSettings(
        rule=rule,
        selection="topk",
        k_per_site=2,
        threshold=0.0,
        n_bootstrap=n_bootstrap,
        seed=seed,
        batch_size=16,
    )
    effects, circuits = {}, {}
    for c in toxic:
        baseline = compute_baseline(m, tok, harmless[c], saes, batch_size=settings.batch_size)
        effects[c], _ = node_effects(
            m, tok, toxic[c], saes, baseline, ids, batch_size=settings.batch_size
        )
        mask = select_circuit(effects[c].mean(0), index.site_of_node, mode="topk", k_per_site=2)
        circuits[c] = fn.TransferCircuit(
            prompts=toxic[c], baseline_prompts=harmless[c], circuit=mask, effects=effects[c]
        )
    error_nodes = np.zeros(index.n_nodes, bool)
    error_nodes[index.error_node(0)] = True
    overlap = compare_categories(
        effects,
        index.site_of_node,
        mode="topk",
        k_per_site=2,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        seed=seed,
        error_nodes=error_nodes,
        rule=rule,
    )
    tests = fn.functional_tests(m, tok, ids, saes, circuits, index.site_of_node, settings)
    transfer = tests.to_json("planted", [], {})
    combined = combine([overlap_line(overlap.to_dict()), *transfer_lines(transfer)])
    loss = tests.circuit_transfer
    return ModelCalibration(
        planted=planted,
        overlap=overlap.verdict,
        circuit_transfer=loss.verdict,
        combined=combined.verdict,
        reasons={
            "overlap": overlap.verdict_reason,
            "circuit transfer": loss.reason,
            "combined": combined.reason,
        },
    )
