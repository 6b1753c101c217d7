"""Benchmark of the activation collector against the naive way and a bare truncated forward.

In one run, on the same prompts and the same sites (the deepest at 3/4 depth):

(a) naive: ``model(**inputs, output_hidden_states=True)`` (every block and the LM head), then the
    requested hidden states sliced at the kept positions and moved to float16 numpy;
(b) ours: :func:`refusal_assets.lm.activations.collect_activations` streaming Parquet to a temp folder;
(c) bare: the decoder truncated after the deepest site's block, no hooks, nothing kept or written.

All three run the very same batches (prompts ordered by length). Each is warmed up once (two
prompts), then timed ``repeats`` times, interleaved; the median wall time is reported, with CPU-time
and paired (back-to-back) cross-checks for shared machines. The collector's vectors are checked to
equal the naive ones. Peak RSS (``ru_maxrss``) of the collector alone is measured for N and 4N
prompts, each in a fresh interpreter so the two numbers are comparable; as loading the model
dominates that peak, the peak of the collection phase alone (VmHWM reset after loading) is
reported too. Entry point: ``refusal-assets bench activations --json``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from refusal_assets.bench.common import bench_device, bench_sample, project_config, sync_device
from refusal_assets.config import ModelConfig
from refusal_assets.lm.sites import Site, decoder_layers

TARGETS = {"ratio_min": 1.0, "overhead_vs_bare_max": 1.15, "rss_ratio_max": 1.2}
_RSS_MARK = "RSS_CHILD_RESULT "


def bench_sites(mc: ModelConfig) -> list[Site]:
    """The config's residual sites, with the deepest at 3/4 depth (layer 18 of 24).

    Residual sites only: the naive way reads ``hidden_states``, which has no MLP / attention outputs.
    Sites deeper than 3/4 depth are dropped, and the 3/4-depth residual is added when missing. Never
    the last block: ``hidden_states[-1]`` is after the final norm, not the residual stream.
    """
    n = mc.architecture.n_layers
    target = max(0, min((3 * n) // 4, n - 2))
    sites = {s for s in mc.sites if s.kind == "resid" and s.layer <= target}
    sites.add(Site(target, "resid"))
    return sorted(sites)


def _keep_mask(batch, all_positions: bool) -> torch.Tensor:
    return (
        batch.post_instruction | batch.attention_mask.bool()
        if all_positions
        else batch.post_instruction
    )


# ---------------------------------------------------------------------------------- the three ways
@torch.no_grad()
def naive_pass(
    model,
    tokenizer,
    prompts: list[str],
    sites: list[Site],
    batch_size: int,
    system_prompt: str | None,
    all_positions: bool,
    device: str,
) -> dict[Site | str, list[np.ndarray]]:
    """(a) Full forward with every hidden state; slice the requested ones at the kept positions.

    Also returns, under ``"rows"``, each kept row's (prompt number, token index from the first real token)."""
    from refusal_assets.lm.chat import batches, encode_chat

    out: dict[Site | str, list[np.ndarray]] = {s: [] for s in sites}
    out["rows"] = []
    for i, chunk in enumerate(batches(prompts, batch_size)):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        hs = model(**batch.model_inputs(), use_cache=False, output_hidden_states=True).hidden_states
        keep = _keep_mask(batch, all_positions)
        for s in sites:
            out[s].append(hs[s.layer + 1][keep].to(torch.float16).cpu().numpy())
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        pad = (batch.attention_mask == 0).sum(-1)
        out["rows"].append(
            np.stack(
                [(b_idx + i * batch_size).cpu().numpy(), (t_idx - pad[b_idx]).cpu().numpy()], axis=1
            )
        )
    return out


def collector_pass(
    model,
    tokenizer,
    sample: pl.DataFrame,
    sites: list[Site],
    batch_size: int,
    system_prompt: str | None,
    all_positions: bool,
    device: str,
    folder: Path,
) -> dict[Site, int]:
    """(b) Our collector, writing one Parquet file per site under ``folder``."""
    from refusal_assets.lm.activations import collect_activations

    paths = {s: folder / f"{s.name}.parquet" for s in sites}
    return collect_activations(
        model,
        tokenizer,
        sample,
        sites,
        paths,
        batch_size=batch_size,
        system_prompt=system_prompt,
        all_positions=all_positions,
        device=device,
        log=lambda _s: None,
    )


@torch.no_grad()
def bare_pass(
    model,
    tokenizer,
    prompts: list[str],
    depth: int,
    batch_size: int,
    system_prompt: str | None,
    device: str,
) -> None:
    """(c) The decoder cut after block ``depth`` (inclusive): no hooks, nothing kept, nothing written."""
    from refusal_assets.lm.chat import batches, encode_chat

    layers = decoder_layers(model)
    base = model.base_model
    if getattr(base, "layers", None) is not layers:
        raise ValueError(f"bare forward: {type(base).__name__} does not keep its blocks in .layers")
    base.layers = nn.ModuleList(list(layers)[: depth + 1])
    try:
        for chunk in batches(prompts, batch_size):
            batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
            base(**batch.model_inputs(), use_cache=False)
    finally:
        base.layers = layers


def count_tokens(
    tokenizer, prompts: list[str], batch_size: int, system_prompt: str | None, all_positions: bool
) -> tuple[int, int]:
    """(real prompt tokens, kept rows per site)."""
    from refusal_assets.lm.chat import batches, encode_chat

    n_tokens = n_rows = 0
    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt)
        n_tokens += int(batch.attention_mask.sum())
        n_rows += int(_keep_mask(batch, all_positions).sum())
    return n_tokens, n_rows


# ------------------------------------------------------------------------------------------- RSS
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a later read covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_child_main(args_json: str) -> None:
    """Run only the collector on N prompts in this (fresh) process; print peak RSS as JSON."""
    args = json.loads(args_json)
    torch.set_num_threads(args["threads"])
    from refusal_assets.lm.models import load_model

    cfg = project_config(args["config_path"])
    mc = cfg.models[0]
    device = args["device"]
    model, tokenizer = load_model(mc, cfg.resolve, device, log=lambda _s: None)
    sample = bench_sample(cfg, args["n_prompts"])
    sites = [Site.parse(s) for s in args["sites"]]
    after_load = _rss_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        rows = collector_pass(
            model,
            tokenizer,
            sample,
            sites,
            mc.batch_size,
            mc.chat_template.system_prompt,
            mc.all_token_positions,
            device,
            Path(tmp),
        )
    seconds = time.perf_counter() - t0
    print(
        _RSS_MARK
        + json.dumps(
            {
                "n_prompts": args["n_prompts"],
                "peak_rss_mb": round(_rss_mb(), 1),
                "rss_after_load_mb": round(after_load, 1),
                "collect_peak_rss_mb": round(_vm_hwm_mb(), 1)
                if reset and _vm_hwm_mb() is not None
                else None,
                "rows_per_site": next(iter(rows.values())),
                "seconds": round(seconds, 2),
            }
        ),
        flush=True,
    )


def measure_rss(
    config_path: str | None, n_prompts: int, sites: list[Site], device: str, threads: int
) -> dict:
    args = json.dumps(
        {
            "config_path": config_path,
            "n_prompts": n_prompts,
            "sites": [s.name for s in sites],
            "device": device,
            "threads": threads,
        }
    )
    # the module named by its import name (``__spec__``), so a rename cannot leave the child behind
    code = f"import sys; from {__spec__.name} import rss_child_main; rss_child_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, args], capture_output=True, text=True, env=os.environ.copy()
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_RSS_MARK):
            return json.loads(line[len(_RSS_MARK) :])
    raise RuntimeError(
        f"RSS child for {n_prompts} prompts failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def _time_ways(
    ways: dict[str, Callable[[list[str]], object]],
    prompts: list[str],
    repeats: int,
    device: str,
    log: Callable[[str], None],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each way on ``prompts``, ``repeats`` times, after a two-prompt warm-up."""
    for fn in ways.values():  # warm-up: a couple of prompts each
        fn(prompts[:2])
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(repeats):  # interleaved, so drift and other load hit every way alike
        for name, fn in ways.items():
            sync_device(device)
            t1, c1 = time.perf_counter(), time.process_time()
            fn(prompts)
            sync_device(device)
            times[name].append(time.perf_counter() - t1)
            cpu[name].append(time.process_time() - c1)
        log(
            f"bench: repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
        )
    return times, cpu


def _max_diff_vs_naive(
    folder: Path, sites: list[Site], prompt_ids: list[str], naive: dict
) -> dict[str, float]:
    """The largest absolute difference per site between the collector's vectors in ``folder`` and
    the naive ones (both float16), matched row by row on (prompt, token index) whatever order the
    collector wrote them in; an AssertionError when the rows differ."""
    from refusal_assets.lm.activations import read_vectors

    max_diff: dict[str, float] = {}
    naive_keys = [(prompt_ids[int(p)], int(t)) for p, t in np.concatenate(naive["rows"])]
    naive_order = sorted(range(len(naive_keys)), key=naive_keys.__getitem__)
    for s in sites:
        vec, meta = read_vectors(folder / f"{s.name}.parquet")
        ref = np.concatenate(naive[s])
        if tuple(vec.shape) != ref.shape:
            raise AssertionError(
                f"bench: {s.name}: collector wrote {tuple(vec.shape)}, naive has {ref.shape}"
            )
        keys = list(zip(meta["prompt_id"].to_list(), meta["token_index"].to_list()))
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if [keys[i] for i in order] != [naive_keys[i] for i in naive_order]:
            raise AssertionError(f"bench: {s.name}: the collector's rows are not the naive ones")
        diff = vec.numpy()[order].astype(np.float32) - ref[naive_order].astype(np.float32)
        max_diff[s.name] = float(np.abs(diff).max())
    return max_diff


def _timing_summary(
    times: dict[str, list[float]], cpu: dict[str, list[float]], n_tokens: int
) -> dict:
    """The timing entries of the result: medians, throughput, the ratios and their cross-checks."""
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: n_tokens / v for k, v in med.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [c / b for c, b in zip(times["collector"], times["bare"])]
    return {
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratio": round(tps["collector"] / tps["naive"], 3),
        "overhead_vs_bare": round(med["collector"] / med["bare"], 3),
        # cross-checks when the machine is shared: CPU time of this process (all its threads) instead
        # of wall time, and the median of the per-repeat collector/bare pairs (run back to back)
        "cpu_seconds": {k: round(v, 3) for k, v in cpu_med.items()},
        "ratio_cpu": round(cpu_med["naive"] / cpu_med["collector"], 3),
        "overhead_vs_bare_cpu": round(cpu_med["collector"] / cpu_med["bare"], 3),
        "overhead_vs_bare_paired": round(statistics.median(paired), 3),
    }


def _rss_summary(
    config_path: str | None, n_prompts: int, sites: list[Site], device: str, threads: int
) -> dict:
    """Peak RSS of the collector alone for ``n_prompts`` and 4x as many, each in a fresh process."""
    small = measure_rss(config_path, n_prompts, sites, device, threads)
    large = measure_rss(config_path, 4 * n_prompts, sites, device, threads)
    return {
        "peak_rss_mb": {"N": small["peak_rss_mb"], "4N": large["peak_rss_mb"]},
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        # the same over the collection phase alone (peak reset after loading the model), where the kernel
        # allows it
        "collect_rss_ratio": round(large["collect_peak_rss_mb"] / small["collect_peak_rss_mb"], 3)
        if small["collect_peak_rss_mb"] and large["collect_peak_rss_mb"]
        else None,
        "rss_detail": {"N": small, "4N": large},
    }


def run_activation_bench(
    config_path: str | None = None,
    n_prompts: int = 32,
    log: Callable[[str], None] = print,
    repeats: int = 3,
    measure_memory: bool = True,
) -> dict:
    """Time (a) naive, (b) our collector, (c) a bare truncated forward; peak RSS of (b) for N and 4N prompts."""
    from refusal_assets.lm.models import load_model

    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1")
    cfg = project_config(config_path)
    mc = cfg.models[0]
    device = bench_device()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    model, tokenizer = load_model(mc, cfg.resolve, device, log)
    log(
        f"bench: loaded {mc.model_key} in {time.perf_counter() - t0:.1f} s on {device} ({threads} torch threads)"
    )
    sites = bench_sites(mc)
    depth = max(s.layer for s in sites)
    sample = bench_sample(cfg, n_prompts)
    prompts = sample["prompt"].to_list()
    bs, sp, allpos = mc.batch_size, mc.chat_template.system_prompt, mc.all_token_positions
    n_tokens, n_rows = count_tokens(tokenizer, prompts, bs, sp, allpos)
    log(
        f"bench: {n_prompts} prompts, {n_tokens} tokens, {n_rows} rows per site, sites {[s.name for s in sites]}, "
        f"batch {bs}"
    )

    with tempfile.TemporaryDirectory(prefix="bench-acts-") as tmp:
        folder = Path(tmp)
        last_naive: dict[str, dict[Site, list[np.ndarray]]] = {}

        def naive(ps: list[str]) -> None:
            last_naive["out"] = naive_pass(model, tokenizer, ps, sites, bs, sp, allpos, device)

        ways: dict[str, Callable[[list[str]], object]] = {
            "bare": lambda ps: bare_pass(model, tokenizer, ps, depth, bs, sp, device),
            "collector": lambda ps: collector_pass(
                model, tokenizer, sample.head(len(ps)), sites, bs, sp, allpos, device, folder
            ),
            "naive": naive,
        }
        times, cpu = _time_ways(ways, prompts, repeats, device, log)
        # correctness: the collector's vectors (last run) equal the naive ones (last run)
        max_diff = _max_diff_vs_naive(
            folder, sites, sample["prompt_id"].to_list(), last_naive["out"]
        )
        del last_naive["out"]
        bytes_written = sum(p.stat().st_size for p in folder.glob("*.parquet"))

    result: dict = {
        "model": mc.model_key,
        "n_layers": mc.architecture.n_layers,
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "rows_per_site": n_rows,
        "sites": [s.name for s in sites],
        "batch_size": bs,
        "device": device,
        "batches": "prompts ordered by length; the same batches for all three ways",
        "torch_threads": threads,
        "repeats": repeats,
        **_timing_summary(times, cpu, n_tokens),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "max_abs_diff_vs_naive": max_diff,
        "parquet_bytes": bytes_written,
    }
    # free the model before the RSS children load their own; the closures above share the variable,
    # so it is rebound rather than deleted
    ways.clear()
    model = None
    del naive
    if measure_memory:
        log(
            f"bench: peak RSS of the collector alone, {n_prompts} and {4 * n_prompts} prompts (fresh processes)"
        )
        result.update(_rss_summary(config_path, n_prompts, sites, device, threads))
    result["targets"] = TARGETS
    result["meets_targets"] = {
        "ratio": result["ratio"] >= TARGETS["ratio_min"],
        "overhead_vs_bare": result["overhead_vs_bare"] <= TARGETS["overhead_vs_bare_max"],
        **(
            {"rss_ratio": result["rss_ratio"] <= TARGETS["rss_ratio_max"]} if measure_memory else {}
        ),
    }
    log(
        "bench: "
        + ", ".join(f"{k} {n_tokens / statistics.median(v):.0f} tok/s" for k, v in times.items())
        + f"; ratio {result['ratio']}, overhead_vs_bare {result['overhead_vs_bare']}"
        + (f", rss_ratio {result['rss_ratio']}" if measure_memory else "")
    )
    return result
