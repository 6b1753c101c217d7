"""Residual-stream (and MLP / attention output) activations, streamed to Parquet batch by batch.

One forward pass per batch serves every requested site; the shared template head is computed once
per batch, and the pass stops right after the deepest block any site needs (no later blocks, no LM head). Rows:
``prompt_id, split, heldout, token_index, is_post_instruction, vector`` (float16, fixed-size list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.lm.chat import ChatBatch, batches, by_length, encode_chat
from refusal_assets.lm.prefill import prefill
from refusal_assets.lm.sites import Site
from refusal_assets.progress import progress
from refusal_assets.storage import atomic_path

CODE_VERSION = "3"
"""Version of the activation code (the ``activations`` and ``sae_corpus_activations`` assets); bump it
when a row changes for the same settings."""


@torch.no_grad()
def forward_sites(
    model: PreTrainedModel, batch: ChatBatch, sites: list[Site], stop_early: bool = True
) -> dict[Site, torch.Tensor]:
    """Activations [B, T, d] at each site for one batch, from one shared-prefix prefill
    (:func:`refusal_assets.lm.prefill.prefill`: the common template head once, then each prompt's own
    tokens; equal to the plain left-padded pass within float tolerance)."""
    return prefill(model, batch, sites, stop_early=stop_early).site_outputs


def _row_table(
    acts: torch.Tensor, batch: ChatBatch, meta: list[dict], all_positions: bool
) -> pa.Table:
    """Flatten the kept positions of one batch into Arrow rows (float16 vectors)."""
    keep = batch.post_instruction | (
        batch.attention_mask.bool() if all_positions else torch.zeros_like(batch.post_instruction)
    )
    b_idx, t_idx = keep.nonzero(as_tuple=True)  # [N], [N]
    first_real = (batch.attention_mask == 0).sum(-1)  # [B]: left-padding length
    vectors = acts[b_idx, t_idx].to(torch.float16).cpu().numpy()  # [N, d]
    d = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float16())
    b_np = b_idx.cpu().numpy()
    return pa.table(
        {
            "prompt_id": pa.array([meta[b]["prompt_id"] for b in b_np], pa.string()),
            "split": pa.array([meta[b]["split"] for b in b_np], pa.string()),
            "heldout": pa.array([meta[b]["heldout"] for b in b_np], pa.bool_()),
            "token_index": pa.array((t_idx - first_real[b_idx]).cpu().numpy().astype(np.int32)),
            "is_post_instruction": pa.array(batch.post_instruction[b_idx, t_idx].cpu().numpy()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )


def collect_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    sites: list[Site],
    out_paths: dict[Site, Path],
    *,
    batch_size: int,
    system_prompt: str | None = None,
    all_positions: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    non_finite: dict[Site, int] | None = None,
) -> dict[Site, int]:
    """Stream every site's activations for ``sample`` to ``out_paths[site]``; returns rows per site
    (and fills ``non_finite[site]`` with the rows holding NaN/inf, counted on the way).

    Memory is bounded by one batch: each batch becomes one row group of each site's file. Files
    appear under their final names only when complete.
    """
    rows = by_length(sample.select("prompt_id", "prompt", "split", "heldout").to_dicts())
    n_rows = {s: 0 for s in sites}
    with contextlib.ExitStack() as stack:
        tmp_paths = {s: stack.enter_context(atomic_path(out_paths[s])) for s in sites}
        prog = stack.enter_context(
            progress("activations: collection", total=len(rows), unit="prompts", log=log)
        )
        writers: dict[Site, pq.ParquetWriter] = {}
        try:
            for i, chunk in enumerate(batches(rows, batch_size)):
                batch = encode_chat(tokenizer, [r["prompt"] for r in chunk], system_prompt).to(
                    device
                )
                acts = forward_sites(model, batch, sites)
                for site in sites:
                    table = _row_table(acts[site], batch, chunk, all_positions)
                    if non_finite is not None:
                        # counted after the float16 cast: a value beyond 65504 is stored as inf
                        non_finite[site] = non_finite.get(site, 0) + non_finite_rows(
                            acts[site][batch.attention_mask.bool()].to(torch.float16)
                        )
                    if site not in writers:
                        writers[site] = pq.ParquetWriter(
                            tmp_paths[site], table.schema, compression="zstd"
                        )
                    writers[site].write_table(table)
                    n_rows[site] += table.num_rows
                prog.update(len(chunk), extra=f"{sum(n_rows.values())} rows")
            for site in sites:
                if (
                    site not in writers
                ):  # no prompts: an empty file with the full schema, never a 0-byte one
                    d = model.config.hidden_size
                    empty = pa.table(
                        {
                            "prompt_id": pa.array([], pa.string()),
                            "split": pa.array([], pa.string()),
                            "heldout": pa.array([], pa.bool_()),
                            "token_index": pa.array([], pa.int32()),
                            "is_post_instruction": pa.array([], pa.bool_()),
                            "vector": pa.FixedSizeListArray.from_arrays(
                                pa.array([], pa.float16()), d
                            ),
                        }
                    )
                    pq.write_table(empty, tmp_paths[site])
        finally:
            for w in writers.values():
                w.close()
    return n_rows


def read_vectors(
    path: Path, post_instruction_only: bool = False
) -> tuple[torch.Tensor, pl.DataFrame]:
    """(vectors [N, d] float16, metadata frame) from one activations file."""
    from refusal_assets.storage import read_parquet

    table = read_parquet(path, "activations file")
    if post_instruction_only:
        table = table.filter(pc.field("is_post_instruction"))
    col = table.column("vector").combine_chunks()
    d = col.type.list_size
    flat = col.values.to_numpy(zero_copy_only=False)
    vectors = torch.from_numpy(np.array(flat, copy=True).reshape(-1, d))
    meta = pl.from_arrow(table.drop(["vector"]))
    return vectors, meta


def non_finite_rows(vectors: torch.Tensor) -> int:
    return int((~torch.isfinite(vectors.float())).any(-1).sum())
