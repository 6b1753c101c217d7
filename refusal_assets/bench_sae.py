"""Training-step throughput against the dense-matmul bound of the same shapes.

The bound is the time of the five dense products a naive TopK step needs (encoder and decoder forward,
grads of W_enc, W_dec and the decoder input). Our step shares ``train_step`` with ``train_sae``; it
keeps the dense encoder forward but decodes and back-propagates through the k active latents only,
so the ratio ours/bound can exceed 1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from refusal_assets.config import SAEConfig
from refusal_assets.sae import init_sae, make_optimizer, train_step

WARMUP = 3
POOL = 8  # distinct synthetic batches, cycled, so memory stays bounded whatever ``steps`` is
TRUE_K = 8  # true features per synthetic sample


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_pair(a: Callable[[int], Any], b: Callable[[int], Any], steps: int, device: str) -> tuple[float, float]:
    """Median seconds per call of ``a(i)`` and ``b(i)``, each timed end to end after ``WARMUP`` untimed
    calls; interleaved so that load from other processes on a shared machine hits both alike."""
    for i in range(WARMUP):
        a(i), b(i)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps):
        for fn, out in zip((a, b), times):
            _sync(device)
            t0 = time.perf_counter()
            fn(i)
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def _synthetic_batches(n: int, batch_size: int, d_in: int, n_feat: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, batch_size, d_in]``: each row a positive mix of ``TRUE_K`` unit directions of a random dictionary."""
    dictionary = F.normalize(torch.randn(n_feat, d_in, generator=gen), dim=-1)
    idx = torch.randint(n_feat, (n * batch_size, TRUE_K), generator=gen)
    mags = torch.rand(n * batch_size, TRUE_K, generator=gen) + 0.5
    x = F.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
    return x.view(n, batch_size, d_in)


def run_sae_bench(
    d_in: int = 896,
    expansion_factor: int = 8,
    k: int = 32,
    batch_size: int = 1024,
    steps: int = 30,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Tokens/s of ``train_step`` (TopK, AuxK inactive as nothing is dead yet) and of the dense bound,
    both medians over ``steps`` interleaved timed steps."""
    d_sae = d_in * expansion_factor
    cfg = SAEConfig(architecture="topk", expansion_factor=expansion_factor, k=k, batch_size=batch_size, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    pool = _synthetic_batches(POOL, batch_size, d_in, d_sae, gen).to(device)  # [POOL, B, d_in]
    flat = pool.view(-1, d_in)
    sae = init_sae(flat, torch.arange(len(flat), device=device), d_sae, cfg, gen, device).train()
    opt = make_optimizer(sae, cfg.lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    # same shapes, dense: z keeps the TopK sparsity but BLAS does not care
    x = pool[0]
    W_enc, W_dec = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()  # [d_in, d_sae], [d_sae, d_in]
    vals, idx = (x @ W_enc).topk(k, dim=-1)
    z = torch.zeros(batch_size, d_sae, device=device).scatter(-1, idx, vals.relu())  # [B, d_sae]
    g_out = torch.randn(batch_size, d_in, generator=gen).to(device)  # dL/dx_hat [B, d_in]
    g_pre = z.clone()  # dL/dpre with the same sparsity pattern [B, d_sae]

    def dense_step(_: int) -> None:
        x @ W_enc  # encoder forward
        z @ W_dec  # decoder forward
        g_out @ W_dec.T  # grad wrt decoder input z
        z.T @ g_out  # grad wrt W_dec
        x.T @ g_pre  # grad wrt W_enc

    def our_step(i: int) -> None:
        train_step(sae, opt, pool[i % POOL], since_fired, cfg)

    ours, bound = _timed_pair(our_step, dense_step, steps, device)
    ours_tps, bound_tps = batch_size / ours, batch_size / bound
    return {
        "ours_tokens_per_s": ours_tps,
        "bound_tokens_per_s": bound_tps,
        "ratio": ours_tps / bound_tps,
        "ours_step_s": ours,
        "bound_step_s": bound,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch_size": batch_size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "device": device,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run_sae_bench(), indent=2))
