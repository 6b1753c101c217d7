"""The execution level (refusal_assets.directions) on the tiny model: ablation everywhere, selection
filters and fallback, Wilson intervals, leave-one-category-out, the verdict rule, the JSON round
trip."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_assets.config import DirectionsConfig
from refusal_assets.directions import verdict as vd
from refusal_assets.directions.candidates import Candidates, collect
from refusal_assets.directions.execution import loco_direction
from refusal_assets.directions.hooks import direction_ablation
from refusal_assets.directions.measure import Rate, Scorer
from refusal_assets.directions.prompts import PromptRow, split_prompts
from refusal_assets.directions.select import Selection, select_direction, select_for_category
from refusal_assets.lm.sites import decoder_layers, output_tensor

WORDS = "how do I bake bread steal a car write poem hack email garden river stone".split()


def rows(categories=("a", "b", "c"), n=8) -> list[PromptRow]:
    out = []
    for c in categories:
        for split in ("toxic", "safe"):
            for i in range(n):
                toxic = split == "toxic"
                text = " ".join(WORDS[(i * 3 + j + len(c)) % len(WORDS)] for j in range(5 + i % 3))
                out.append(
                    PromptRow(
                        prompt_id=f"{c}-{split}-{i}",
                        prompt=f"{c} {text}",
                        category=c,
                        split=split,
                        heldout=i % 4 == 0,
                        refused=toxic,
                        refusal_score=1.0 if toxic else -1.0,
                    )
                )
    return out


@pytest.fixture(scope="module")
def scorer(tiny_model, tiny_cfg):
    model, tok = tiny_model
    return Scorer(model, tok, tiny_cfg.models[0])


def _along(captured: list[torch.Tensor], unit: torch.Tensor) -> tuple[float, float]:
    """(largest |x . unit|, largest |x|) over every captured activation."""
    comp = max(float((x.float() @ unit).abs().max()) for x in captured)
    scale = max(float(x.float().abs().max()) for x in captured)
    return comp, scale


def test_ablation_zeroes_the_direction_at_every_layer_and_position(scorer):
    """Block inputs and outputs of every layer, in the prefix pass, the prompts' own tokens and
    every generated token: no component along the ablated direction; without it, a clear one."""
    model = scorer.model
    d = model.config.hidden_size
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1)) * 3
    unit = direction / direction.norm()
    prompts = [r for r in rows(n=3) if r.split == "toxic"][:4]
    blocks = decoder_layers(model)

    def run(ablate: bool) -> tuple[list[torch.Tensor], list[int]]:
        captured, token_counts = [], []

        def read_input(_module, args, kwargs) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        def read_output(_module, _inputs, output) -> None:
            captured.append(output_tensor(output).detach())
            token_counts.append(output_tensor(output).shape[1])

        hooks = []
        try:
            if ablate:
                ctx = direction_ablation(model, direction)
                ctx.__enter__()
            for block in blocks:  # registered after the ablation's hooks: they see its edits
                hooks.append(block.register_forward_pre_hook(read_input, with_kwargs=True))
                hooks.append(block.register_forward_hook(read_output))
            judged = scorer.judge(prompts, max_new_tokens=4)
        finally:
            for h in hooks:
                h.remove()
            if ablate:
                ctx.__exit__(None, None, None)
        assert len(judged.responses) == len(prompts)
        return captured, token_counts

    captured, counts = run(ablate=True)
    comp, scale = _along(captured, unit)
    assert comp <= 1e-5 * scale, (comp, scale)
    assert (
        1 in counts and max(counts) > 1
    )  # decode steps (one token) and prompt passes were both hooked
    assert len(counts) >= 3 * len(
        blocks
    )  # prefix, own tokens and at least one generated token, every block
    clean, _ = run(ablate=False)
    comp_clean, scale_clean = _along(clean, unit)
    assert comp_clean > 1e-2 * scale_clean
    # hooks are gone: a plain pass after the context has the component again
    assert not any(b._forward_pre_hooks for b in blocks)


def test_wilson_intervals():
    half = Rate.of([True] * 5 + [False] * 5)
    assert (half.k, half.n, half.rate) == (5, 10, 0.5)
    assert half.ci_lo == pytest.approx(0.2366, abs=1e-4) and half.ci_hi == pytest.approx(
        0.7634, abs=1e-4
    )
    none = Rate.of([False] * 10)
    assert none.ci_lo == 0.0 and none.ci_hi == pytest.approx(0.2775, abs=1e-4)
    empty = Rate.of([])
    assert empty.n == 0 and math.isnan(empty.rate) and math.isnan(empty.ci_lo)


def _candidates(scorer, splits) -> Candidates:
    acts = collect(scorer, splits.train_harmful + splits.train_harmless, [1, 2, 3], 1)
    d = acts.values.shape[-1]
    g = torch.Generator().manual_seed(0)
    big = torch.randn(d, generator=g)
    norms = acts.values[:, 0].norm(dim=-1).mean(0)  # [3]
    directions = torch.stack(
        [
            torch.randn(d, generator=g) * 1e-6,  # layer 1: a near-zero difference of means
            big / big.norm() * norms[1],  # layer 2
            acts.values[:, 0, 2].mean(
                0
            ),  # layer 3: the mean activation itself (ablating it moves the output)
        ]
    )[None]  # [1, 3, d]
    return Candidates(
        layers=[1, 2, 3], positions=[-1], directions=directions, activation_norms=norms[None]
    )


def test_selection_rejects_tiny_norm_and_large_kl_and_falls_back(scorer):
    splits = split_prompts(rows(), 0.35, 0)
    cands = _candidates(scorer, splits)
    loose = DirectionsConfig(kl_threshold=1e9, induce_threshold=-1e9)
    scored = select_direction(scorer, cands, splits.val_harmful, splits.val_harmless, loose)
    by_layer = {c.layer: c for c in scored.candidates}
    assert by_layer[1].rejected == "norm" and math.isnan(by_layer[1].ablated_score)
    assert by_layer[3].kl > by_layer[2].kl > 0
    # a KL threshold between the two: layer 3 (large KL) is rejected, layer 2 is selected
    cut = (by_layer[2].kl + by_layer[3].kl) / 2
    strict = DirectionsConfig(kl_threshold=cut, induce_threshold=-1e9)
    chosen = select_direction(scorer, cands, splits.val_harmful, splits.val_harmless, strict)
    assert {c.layer: c.rejected for c in chosen.candidates} == {1: "norm", 2: None, 3: "kl"}
    assert (chosen.layer, chosen.position, chosen.fallback) == (2, -1, None)
    # nothing passes the steering filter: the lowest ablated score among scored ones, marked
    none = select_direction(
        scorer,
        cands,
        splits.val_harmful,
        splits.val_harmless,
        DirectionsConfig(kl_threshold=1e9, induce_threshold=1e9),
    )
    assert none.fallback and "filters" in none.fallback and none.layer in (2, 3)
    # a category with too few validation prompts takes the pooled layer and position
    pooled = Selection(position=-1, layer=3, fallback=None, baseline_score=0.0, candidates=[])
    few = select_for_category(
        scorer,
        cands,
        splits.val_harmful[:2],
        splits.val_harmless,
        pooled,
        DirectionsConfig(min_selection_prompts=5),
    )
    assert (few.layer, few.position) == (
        3,
        -1,
    ) and "2 refusing validation prompts < 5" in few.fallback
    # and one whose own candidates all fail the filters too
    failing = select_for_category(
        scorer,
        cands,
        splits.val_harmful,
        splits.val_harmless,
        pooled,
        DirectionsConfig(min_selection_prompts=2, induce_threshold=1e9),
    )
    assert (failing.layer, failing.position) == (3, -1) and "pooled layer" in failing.fallback


def test_leave_one_category_out_excludes_the_category(scorer):
    splits = split_prompts(rows(), 0.35, 0)
    acts = collect(scorer, splits.train_harmful + splits.train_harmless, [2], 1)
    loco = loco_direction(acts, splits, "b", 0, 0)
    b_ids = {r.prompt_id for r in rows() if r.category == "b"}
    assert loco.prompt_ids and not loco.prompt_ids & b_ids
    expected_ids = {
        r.prompt_id for r in splits.train_harmful + splits.train_harmless if r.category != "b"
    }
    assert loco.prompt_ids == expected_ids
    # B's activations do not move it
    changed = acts.values.clone()
    for i, pid in enumerate(acts.prompt_ids):
        if pid in b_ids:
            changed[i] += 100.0
    moved = loco_direction(
        type(acts)(
            prompt_ids=acts.prompt_ids, layers=acts.layers, positions=acts.positions, values=changed
        ),
        splits,
        "b",
        0,
        0,
    )
    assert torch.allclose(moved.direction, loco.direction)
    assert loco_direction(acts, split_prompts(rows(categories=("b",)), 0.35, 0), "b", 0, 0) is None


def _rate(k: int, n: int) -> Rate:
    return Rate.of([True] * k + [False] * (n - k))


@pytest.mark.parametrize(
    ("pooled", "random", "calls", "expected"),
    [
        ((0, 30), (28, 30), [vd.SHARED] * 4, vd.MONOLITHIC),
        ((0, 30), (28, 30), [vd.SPECIFIC] * 4, vd.MODULAR),
        ((0, 30), (28, 30), [vd.SHARED] * 3 + [vd.SPECIFIC], vd.CORE_TAIL),
        ((15, 30), (28, 30), [vd.SHARED, vd.SPECIFIC, vd.SPECIFIC], vd.MIXED),
        (
            (0, 30),
            (1, 30),
            [vd.SHARED] * 4,
            vd.INSUFFICIENT,
        ),  # the random control removes refusal too
        ((0, 30), (28, 30), [vd.UNDECIDED] * 3 + [vd.SHARED], vd.INSUFFICIENT),
        ((0, 30), (28, 30), [vd.SHARED, vd.TOO_FEW, vd.TOO_FEW], vd.INSUFFICIENT),
    ],
)
def test_verdict_rule(pooled, random, calls, expected):
    verdict, reason = vd.verdict_execution(_rate(*pooled), _rate(*random), calls, margin=0.25)
    assert verdict == expected and reason


def test_category_calls_use_symmetric_margins():
    assert vd.call_category(_rate(0, 20), 4, 0.25) == vd.SHARED
    assert vd.call_category(_rate(20, 20), 4, 0.25) == vd.SPECIFIC
    assert vd.call_category(_rate(10, 20), 4, 0.25) == vd.UNDECIDED
    assert vd.call_category(_rate(0, 3), 4, 0.25) == vd.TOO_FEW


@pytest.mark.parametrize("world", ["shared", "specific"])
def test_planted_worlds_are_recovered(tiny_model, tiny_cfg, world, tmp_path):
    """One shared direction -> monolithic; one direction per category -> modular (attention on in
    every block, so a prefix left un-ablated would leak the direction)."""
    from refusal_assets.directions.planted import EXPECTED, recover_execution_verdict

    model, tok = tiny_model
    dcfg = DirectionsConfig(
        layer_stride=1, max_new_tokens=2, steering_coefficients=[], selection_prompts=6
    )
    run = recover_execution_verdict(
        model, tok, tiny_cfg.models[0], world, n_per_split=12, directions=dcfg
    )
    result = run.result
    assert result.verdict_execution == EXPECTED[world], result.verdict_reason
    assert result.random_still_refusing.rate == 1.0
    if world == "shared":
        assert result.pooled_still_refusing.rate == 0.0 and result.loco_still_refusing == 0.0
    else:
        assert all(c.loco_still_refusing.rate == 1.0 for c in result.categories)
    assert result.n_layers + 1 == sum(k.startswith("pooled.layer") for k in run.directions)
    # the one JSON writer and reader give the typed result back
    from refusal_assets.directions.result import read_result, write_result

    back = read_result(write_result(result, tmp_path / "result.json"))
    assert (back.verdict_execution, back.layer, back.position) == (
        result.verdict_execution,
        result.layer,
        result.position,
    )
    assert back.pooled_still_refusing == result.pooled_still_refusing
    assert [c.loco_still_refusing for c in back.categories] == [
        c.loco_still_refusing for c in result.categories
    ]
    assert back.selection.candidates[0].layer == result.selection.candidates[0].layer


def test_pooled_leave_one_out_decides_when_each_category_is_too_small_to():
    """At the default's 5-11 refusing prompts a category's Wilson interval cannot fall under the
    margin, so the rule pools the leave-one-out rates: 0 of 83 still refusing is monolithic, all
    still refusing is modular (the same margin), and a split world stays undecided."""
    from refusal_assets.directions import verdict as vd
    from refusal_assets.directions.measure import Rate

    def rate(k, n):
        return Rate.of([True] * k + [False] * (n - k))

    def decide(cats, pooled=rate(0, 21)):
        calls = [vd.call_category(c, 4, 0.25) for c in cats]
        assert all(c == vd.UNDECIDED for c in calls)  # each category alone decides nothing
        return vd.verdict_execution(pooled, rate(17, 21), calls, 0.25, vd.pooled_rate(cats))[0]

    sizes = [9, 9, 6, 5, 11, 6, 9, 10, 9, 9]
    assert vd.pooled_rate([rate(0, n) for n in sizes]).n == 83
    assert decide([rate(0, n) for n in sizes]) == "monolithic"
    assert decide([rate(n, n) for n in sizes], pooled=rate(15, 21)) == "modular"
    half = [rate(0, n) for n in sizes[:5]] + [rate(n, n) for n in sizes[5:]]
    assert decide(half) not in ("monolithic", "modular")


def test_added_scores_match_the_hook(scorer):
    """The resumed passes of ``Scorer.added_scores`` (the steering curves and the selection's
    steering filter use them) give the scores of the addition hook on full passes, for several
    vectors at once, in input order, at every layer; a zero vector gives the clean scores."""
    from refusal_assets.directions.hooks import activation_addition

    model = scorer.model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    prompts = rows(n=5)[:7]
    vectors = [torch.randn(d, generator=g) * s for s in (0.5, 2.0, 6.0)] + [torch.zeros(d)]
    n_layers = len(decoder_layers(model))
    for layer in range(n_layers):
        got = scorer.added_scores(prompts, vectors, layer)  # [V, N]
        assert got.shape == (len(vectors), len(prompts))
        for v_i, v in enumerate(vectors):
            with activation_addition(model, v, layer):
                want = scorer.scores(prompts)
            assert got[v_i] == pytest.approx(want, abs=1e-4), (layer, v_i)
        assert got[-1] == pytest.approx(scorer.scores(prompts), abs=1e-4)
        # the vectors change the scores (the test can fail)
        assert abs(got[2] - got[-1]).max() > 1e-3


def test_judge_groups_equal_one_judge_per_intervention(scorer):
    """One batched generation with an intervention per group (ablations of different directions,
    an addition, none) gives each group the tokens, verdicts and first-token scores of its own
    ``judge`` call under the context-manager hooks."""
    from refusal_assets.directions.hooks import activation_addition
    from refusal_assets.directions.measure import Intervened

    model = scorer.model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(d, generator=g) * 4, torch.randn(d, generator=g) * 4
    prompts = rows(n=6)
    a, b, c = prompts[:7], prompts[7:12], prompts[12:21]
    layer = 2
    groups = [
        Intervened(rows=a, ablate=u),
        Intervened(rows=b, add=v),
        Intervened(rows=c, ablate=v),
        Intervened(rows=a),
    ]
    got = scorer.judge_groups(groups, max_new_tokens=6, add_layer=layer)
    with direction_ablation(model, u):
        want_a = scorer.judge(a, 6)
    with activation_addition(model, v, layer):
        want_b = scorer.judge(b, 6)
    with direction_ablation(model, v):
        want_c = scorer.judge(c, 6)
    want_clean = scorer.judge(a, 6)
    for have, want in zip(got, [want_a, want_b, want_c, want_clean]):
        assert have.prompt_ids == want.prompt_ids
        assert have.responses == want.responses
        assert have.refused == want.refused
        assert have.scores == pytest.approx(want.scores, abs=1e-4)
    # the interventions change the generations (the test can fail)
    assert got[0].responses != got[3].responses or not (got[0].scores == got[3].scores).all()
