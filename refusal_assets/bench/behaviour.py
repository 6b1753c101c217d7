"""Benchmark of the behaviour step's generation against plain ``model.generate``.

In one process, on the same prompts, batches and settings (greedy, ``max_new_tokens`` and the
refusal-phrase stop rule of the config, the config's batch size):

(a) plain: :func:`refusal_assets.lm.behaviour.generate_plain`, i.e. ``model.generate(do_sample=False)``
    on the full left-padded batch, with the phrase rule as a transformers stopping criterion;
(b) ours: :func:`refusal_assets.lm.behaviour.generate` as ``run_behaviour`` calls it: the shared
    template head prefilled once per batch, then only each prompt's own tokens; the batches then
    decoded together (up to ``generation.decode_batch_size`` rows), rows leaving as they end.

Both are warmed up on one batch, then timed ``repeats`` times, interleaved; the median is reported.
Their responses and stop reasons must be identical (asserted: a faster decoder that answers
differently is not faster). Throughput is prompt plus generated tokens per second. Each way's
executed FLOPs (2 x non-embedding parameters per token it runs, plus the LM head where it takes
logits) over its time, as a fraction of the machine's measured dense-matmul FLOP rate, says how
close each comes to the hardware. Entry point: ``refusal-assets bench behaviour --json``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from refusal_assets.bench.common import bench_device, bench_sample, project_config, sync_device
from refusal_assets.lm.chat import by_length, encode_chat
from refusal_assets.lm.prefill import shared_prefix_length

TARGETS = {"ratio_min": 1.5}


def matmul_flops_per_s(d: int, rows: int, device: str, repeats: int = 5) -> float:
    """Measured dense fp32 matmul rate [rows, d] x [d, 4d] (the shape of an MLP projection)."""
    a, b = torch.randn(rows, d, device=device), torch.randn(d, 4 * d, device=device)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        sync_device(device)
        t = time.perf_counter()
        a @ b
        sync_device(device)
        times.append(time.perf_counter() - t)
    return 2 * rows * d * 4 * d / min(times)


def run_behaviour_bench(
    config_path: str | None = None,
    n_prompts: int = 64,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    from refusal_assets.lm.behaviour import decode_groups, generate, generate_plain
    from refusal_assets.lm.models import load_model

    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1")
    cfg = project_config(config_path)
    mc = cfg.models[0]
    device = bench_device()
    model, tokenizer = load_model(mc, cfg.resolve, device, log)
    stop = mc.refusal.phrases if mc.generation.stop_when_judged else None
    new = mc.generation.max_new_tokens
    prompts = [r["prompt"] for r in by_length(bench_sample(cfg, n_prompts).to_dicts())]
    # the batches run_behaviour makes: prefill chunks of batch_size, decoded together in groups
    groups = [
        [
            encode_chat(tokenizer, chunk, mc.chat_template.system_prompt).to(device)
            for chunk in group
        ]
        for group in decode_groups(prompts, mc)
    ]
    encoded = [b for group in groups for b in group]
    d, vocab = model.config.hidden_size, model.config.vocab_size
    n_params = (
        sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    )
    per_token = 2 * (n_params - vocab * d)  # decoder blocks (the LM head is counted where it runs)
    head = 2 * d * vocab

    def run(way: str):
        if way == "plain":  # model.generate, one batch of batch_size at a time
            return [generate_plain(model, tokenizer, b, new, stop_phrases=stop) for b in encoded]
        # ours, as run_behaviour calls it: prefill per batch, decode up to decode_batch_size rows together
        return [generate(model, tokenizer, group, new, stop_phrases=stop) for group in groups]

    log(
        f"bench behaviour: {len(prompts)} prompts in {len(encoded)} batches of {mc.batch_size}, {device}"
    )
    run("ours"), run("plain")  # warm-up (also checks both run)
    times, results = _time_ways(run, repeats, device, log)
    ours, plain = results["ours"], results["plain"]
    responses_ours = [t for g in ours for t in g.responses]
    responses_plain = [t for g in plain for t in g.responses]
    reasons_ours = [r for g in ours for r in g.stop_reasons]
    identical = responses_ours == responses_plain and reasons_ours == [
        r for g in plain for r in g.stop_reasons
    ]
    if not identical:
        diff = sum(a != b for a, b in zip(responses_ours, responses_plain))
        raise AssertionError(
            f"bench behaviour: {diff} of {len(responses_ours)} responses differ from model.generate"
        )
    prompt_tokens = sum(int(b.attention_mask.sum()) for b in encoded)
    new_tokens = sum(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in responses_ours
    )
    tokens = prompt_tokens + new_tokens
    med = {w: statistics.median(v) for w, v in times.items()}
    flops = _executed_flops(encoded, plain, ours, per_token, head)
    peak = matmul_flops_per_s(d, 1024, device)
    out = {
        "device": device,
        "threads": torch.get_num_threads(),
        "model": mc.id,
        "n_prompts": len(prompts),
        "batch_size": mc.batch_size,
        "decode_batch_size": mc.generation.decode_batch_size,
        "max_new_tokens": new,
        "stop_when_judged": bool(stop),
        "stop_reasons": {k: reasons_ours.count(k) for k in ("judged", "eos", "length")},
        "responses_identical": identical,
        "tokens": tokens,
        "plain_seconds": round(med["plain"], 6),
        "ours_seconds": round(med["ours"], 6),
        "plain_tokens_per_s": round(tokens / med["plain"], 1),
        "ours_tokens_per_s": round(tokens / med["ours"], 1),
        "ratio_ours_over_plain": round(med["plain"] / med["ours"], 3),
        "plain_decode_rows": sum(g.decode_rows for g in plain),
        "ours_decode_rows": sum(g.decode_rows for g in ours),
        "matmul_gflops": round(peak / 1e9, 1),
        "plain_fraction_of_matmul_bound": round(flops["plain"] / med["plain"] / peak, 3),
        "ours_fraction_of_matmul_bound": round(flops["ours"] / med["ours"] / peak, 3),
        "targets": TARGETS,
    }
    out["meets_targets"] = out["ratio_ours_over_plain"] >= TARGETS["ratio_min"] and identical
    return out


def _time_ways(
    run: Callable[[str], list], repeats: int, device: str, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Time ``plain`` and ``ours`` alternately ``repeats`` times; the last results of each."""
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    results = {}
    for r in range(repeats):
        for way in ("plain", "ours"):
            sync_device(device)
            t = time.perf_counter()
            results[way] = run(way)
            sync_device(device)
            times[way].append(time.perf_counter() - t)
            log(f"  repeat {r + 1}/{repeats} {way}: {times[way][-1]:.2f} s")
    return times, results


def _executed_flops(encoded: list, plain: list, ours: list, per_token: int, head: int) -> dict:
    """Executed FLOPs of each way."""
    # Executed FLOPs: plain runs every padded position of the batch, then every row at every step;
    # ours runs the shared head once, the own tokens of each row (padded to the batch's longest),
    # then only the rows still generating.
    return {
        "plain": sum(b.input_ids.numel() * per_token + len(b.input_ids) * head for b in encoded)
        + sum(g.decode_rows * (per_token + head) for g in plain),
        "ours": sum(
            (L + len(b.input_ids) * (b.input_ids.shape[1] - L)) * per_token
            + len(b.input_ids) * head
            for b, L in ((b, shared_prefix_length(b)) for b in encoded)
        )
        + sum(g.decode_rows * (per_token + head) for g in ours),
    }
