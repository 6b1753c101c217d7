"""The streaming row source: same rows, same SAE weights as the in-memory tensor, bounded reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refusal_assets.config import SAEConfig
from refusal_assets.sae.rows import ParquetRows, SubsetRows, TensorRows, as_rows
from refusal_assets.sae.training import train_sae

D_IN = 12


def write_acts(path, vectors: np.ndarray, prompt_ids: list[str], group_rows: int = 37) -> None:
    """An activations file like the pipeline's: float16 fixed-size-list vectors, several row groups."""
    table = pa.table(
        {
            "prompt_id": pa.array(prompt_ids, pa.string()),
            "is_post_instruction": pa.array(np.arange(len(prompt_ids)) % 3 == 0),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.float16).reshape(-1), pa.float16()), vectors.shape[1]
            ),
        }
    )
    pq.write_table(table, path, row_group_size=group_rows)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths, parts, ids = [], [], []
    for c, n in enumerate((150, 230)):  # two categories, prompt ids unique across them
        v = (rng.standard_normal((n, D_IN)) * 3 + 1).astype(np.float16)
        pid = [f"c{c}-p{i // 5}" for i in range(n)]
        write_acts(tmp_path / f"cat{c}.parquet", v, pid)
        paths.append(tmp_path / f"cat{c}.parquet")
        parts.append(v)
        ids += pid
    return paths, torch.from_numpy(np.concatenate(parts)), ids


def test_parquet_rows_serve_the_file_rows(files, tmp_path):
    paths, x, ids = files
    rows = ParquetRows.from_parquet(paths, scratch=tmp_path / "scratch")
    assert (len(rows), rows.d_in) == (380, D_IN)
    idx = torch.tensor([379, 0, 5, 5, 151, 42])
    assert torch.equal(rows.take(idx), x[idx])
    assert rows.take(idx).dtype == torch.float16
    # prompts: one group id per distinct prompt_id, across files
    assert len(np.unique(rows.group_ids)) == len(set(ids)) == 30 + 46
    assert (rows.group_ids[:5] == rows.group_ids[0]).all() and rows.group_ids[5] != rows.group_ids[
        0
    ]
    assert rows.post_instruction.sum() == 50 + 77
    np.testing.assert_allclose(rows.norms, x.float().norm(dim=-1).numpy(), rtol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        rows.take(torch.tensor([380]))
    sub = SubsetRows(rows, torch.tensor([3, 200]))
    assert len(sub) == 2 and torch.equal(sub.take(torch.tensor([1, 0])), x[[200, 3]])
    rows.close()


@pytest.mark.parametrize("tied_encoder", [False, True])
def test_streaming_training_gives_the_in_memory_weights(files, tied_encoder):
    paths, x, _ = files
    rows = ParquetRows.from_parquet(paths)
    cfg = SAEConfig(
        k=3,
        batch_size=32,
        max_steps=40,
        eval_every=10,
        dead_after_tokens=64,
        tied_encoder=tied_encoder,
    )
    streamed, h_stream = train_sae(rows, rows.group_ids, cfg, d_sae=96)[:2]
    in_memory, h_mem = train_sae(x, rows.group_ids, cfg, d_sae=96)[:2]
    for key, value in in_memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], value), key
    assert h_stream["val_fvu"] == h_mem["val_fvu"] and h_stream["n_val"] == h_mem["n_val"] > 0
    assert max(h_mem["aux_loss"]) > 0


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.parquet: activation file not found"):
        ParquetRows.from_parquet([tmp_path / "nope.parquet"])
    pq.write_table(pa.table({"prompt_id": ["a"], "x": [1.0]}), tmp_path / "novec.parquet")
    with pytest.raises(ValueError, match=r"novec\.parquet: missing column 'vector'"):
        ParquetRows.from_parquet([tmp_path / "novec.parquet"])
    write_acts(tmp_path / "w12.parquet", np.zeros((4, 12)), ["a"] * 4)
    write_acts(tmp_path / "w8.parquet", np.zeros((4, 8)), ["b"] * 4)
    with pytest.raises(
        ValueError, match=r"w8\.parquet: vectors of width 8, but earlier files have 12"
    ):
        ParquetRows.from_parquet([tmp_path / "w12.parquet", tmp_path / "w8.parquet"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        ParquetRows.from_parquet([tmp_path / "junk.parquet"])


def test_as_rows():
    t = torch.zeros(3, 4)
    assert isinstance(as_rows(t), TensorRows) and len(as_rows(t)) == 3
    with pytest.raises(ValueError, match=r"need vectors \[n, d_in\]"):
        as_rows(torch.zeros(3))
    with pytest.raises(TypeError, match="Rows source"):
        as_rows([1, 2])
