"""Feature cards on the tiny config: examples are the SAE's real activations, rank 1 is the maximum,
every circuit latent has a card; annotations are validated; the renderers escape."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from refusal_assets.config import ConfigError, load_config
from refusal_assets.features.annotations import describe_latent, load_annotations
from refusal_assets.features.cards import WindowToken, read_cards
from refusal_assets.features.files import latent_descriptions
from refusal_assets.features.lens import pooled_direction, refusal_cosines
from refusal_assets.features.render import card_html, card_markdown, circuit_membership
from refusal_assets.layout import Layout
from refusal_assets.lm.activations import read_vectors
from refusal_assets.sae.files import CFG_FILE, load_sae
from refusal_assets_tests.conftest import copy_tiny_run

ROOT = Path(__file__).resolve().parent.parent
CFG = load_config(ROOT / "configs" / "tiny.yaml")
SITES = CFG.site_keys()
CATEGORIES = sorted(CFG.sae.train_categories or [])


@pytest.fixture(scope="module")
def storage(shared_tiny_run, tmp_path_factory) -> Path:
    return copy_tiny_run(shared_tiny_run, tmp_path_factory.mktemp("features"))[1]


def _encoded_rows(
    layout: Layout, site_key: str
) -> tuple[torch.Tensor, torch.Tensor, pl.DataFrame, np.ndarray]:
    """Every stored row of the site, in the asset's order: (x, z, meta, typical [n])."""
    vectors, metas = [], []
    for c in CATEGORIES:
        v, m = read_vectors(layout.activations(site_key, c))
        vectors.append(v)
        metas.append(m.with_columns(pl.lit(c).alias("category")))
    x = torch.cat(vectors)
    sae = load_sae(layout.sae(site_key))
    with torch.no_grad():
        z = sae.encode(x.float())
    max_norm = json.loads((layout.sae(site_key) / CFG_FILE).read_text()).get("max_input_norm")
    typical = x.float().norm(dim=-1).numpy() <= (max_norm if max_norm is not None else np.inf)
    return x, z, pl.concat(metas), typical


def check_examples_are_sae_activations(storage: Path) -> None:
    layout = Layout(storage)
    for site_key in SITES:
        x, z, meta, typical = _encoded_rows(layout, site_key)
        top = pl.read_parquet(layout.feature_top_examples(site_key))
        assert top.height > 0, site_key
        assert {"latent", "rank", "prompt_id", "token_index", "activation"} <= set(top.columns)
        rows = top["row"].to_numpy()
        # the listed row is the stored row named by prompt_id and token_index
        assert (meta["prompt_id"].to_numpy()[rows] == top["prompt_id"].to_numpy()).all()
        assert (meta["token_index"].to_numpy()[rows] == top["token_index"].to_numpy()).all()
        assert (meta["category"].to_numpy()[rows] == top["category"].to_numpy()).all()
        expected = z[
            torch.from_numpy(rows), torch.from_numpy(top["latent"].to_numpy().astype(np.int64))
        ]
        np.testing.assert_allclose(top["activation"].to_numpy(), expected.numpy(), rtol=2e-2)
        z_typical = z.clone()
        z_typical[torch.from_numpy(~typical)] = 0.0
        column_max = z_typical.max(0).values.numpy()
        first = top.filter(pl.col("rank") == 1).sort("latent")
        np.testing.assert_allclose(
            first["activation"].to_numpy(), column_max[first["latent"].to_numpy()], rtol=1e-5
        )
        # a latent without examples never fires on a stored row
        silent = np.setdiff1d(np.arange(z.shape[1]), first["latent"].to_numpy())
        assert (column_max[silent] == 0).all()
        for _, group in top.group_by("latent"):
            ranked = group.sort("rank")
            assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
            assert (np.diff(ranked["activation"].to_numpy()) <= 1e-6).all()
            vectors = [tuple(v) for v in x[torch.from_numpy(ranked["row"].to_numpy())].tolist()]
            assert len(set(vectors)) == len(vectors), "identical vectors listed twice"


def check_every_circuit_latent_has_a_card(storage: Path) -> None:
    layout = Layout(storage)
    model = CFG.models[0].model_key
    circuits = {c: layout.load_circuit(model, c)[0] for c in CATEGORIES}
    for site_key in SITES:
        site = site_key.split("__", 1)[1]
        features = read_cards(layout.feature_cards(site_key))
        assert len(features.cards) == features.d_sae == load_sae(layout.sae(site_key)).d_sae
        members = circuit_membership(circuits, site)
        assert members, f"no circuit latent at {site}"
        descriptions = latent_descriptions(layout.feature_latents(site_key))
        for m in members:
            card = features.card(m.latent)
            assert card.latent == m.latent and card.description == descriptions[m.latent]
            assert card.live == bool(card.top_examples)
            if card.live:
                assert card.top_examples[0].activation == pytest.approx(
                    card.max_activation, rel=1e-5
                )
                ex = card.top_examples[0]
                assert ex.token == next(
                    w.token for w in ex.window if w.token_index == ex.token_index
                )
                assert ex.category in CATEGORIES and ex.split in {"safe", "hard", "toxic"}
            assert len(card.logit_top) == len(card.logit_bottom) == 10
            assert (
                card.logit_top[0].score >= card.logit_top[-1].score >= card.logit_bottom[-1].score
            )
            assert sum(g.n_rows for g in card.groups) == features.n_rows


def test_examples_are_the_saes_activations_and_rank_1_is_the_maximum(storage):
    check_examples_are_sae_activations(storage)


def test_every_latent_of_every_circuit_has_a_card(storage):
    check_every_circuit_latent_has_a_card(storage)


def test_quantile_examples_lie_below_the_top_and_fire(storage):
    features = read_cards(Layout(storage).feature_cards(SITES[0]))
    live = features.live
    assert live
    with_quantiles = [c for c in live if c.quantile_examples]
    assert with_quantiles
    for card in with_quantiles:
        top_rows = {e.row for e in card.top_examples}
        for ex in card.quantile_examples:
            assert 0 < ex.activation <= card.max_activation and ex.row not in top_rows
        rates = {(g.category, g.split): g.firing_rate for g in card.groups}
        assert all(0 <= r <= 1 for r in rates.values())


def test_refusal_cosine_reads_the_pooled_direction_of_the_sites_output(tmp_path):
    decoder = torch.eye(4)[:3]  # latent i writes along axis i
    path = tmp_path / "directions.safetensors"
    save_file({"pooled.layer2": torch.tensor([0.0, 2.0, 0.0, 0.0])}, str(path))
    direction, note = pooled_direction(path, site_layer=1)  # resid1's output feeds block 2
    assert "pooled.layer2" in note
    np.testing.assert_allclose(refusal_cosines(decoder, direction), [0.0, 1.0, 0.0], atol=1e-6)
    assert pooled_direction(path, site_layer=0)[0] is None
    missing, why = pooled_direction(tmp_path / "absent.safetensors", site_layer=1)
    assert missing is None and "not found" in why
    assert refusal_cosines(decoder, None) is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_annotations_are_validated_with_file_and_key(tmp_path):
    sizes = {"resid1": 256, "resid2": 256}
    good = _write(
        tmp_path / "good.yaml", "resid1:\n  3: harm-topic words\n  255: ' refusal opener '\n"
    )
    assert load_annotations(good, sizes) == {
        "resid1": {3: "harm-topic words", 255: "refusal opener"}
    }
    assert load_annotations(tmp_path / "absent.yaml", sizes) == {}
    cases = {
        "resid9:\n  1: x\n": r"key 'resid9': not a site",
        "resid1:\n  256: x\n": r"key 'resid1.256': latent out of range",
        "resid1:\n  -1: x\n": r"key 'resid1.-1': latent out of range",
        "resid1:\n  4: ''\n": r"key 'resid1.4'",
        "resid1:\n  four: x\n": r"key 'resid1.four'",
        "resid1:\n  4: a\n  4: b\n": r"duplicate|twice|4",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = _write(tmp_path / f"bad{i}.yaml", text)
        with pytest.raises(ConfigError, match=message) as err:
            load_annotations(path, sizes)
        assert str(path) in str(err.value)


def test_description_is_the_annotation_else_the_tokens():
    assert describe_latent("refusal opener", True, ["x"], ["y"]) == "refusal opener"
    line = describe_latent(None, True, ["bomb", "kill"], [" Sorry", "cannot"])
    assert line == "fires on 'bomb', 'kill'; promotes 'Sorry', 'cannot'"
    assert describe_latent(None, False, [], ["a"]).startswith("dead")


def test_renderers_escape_and_highlight(storage):
    card = read_cards(Layout(storage).feature_cards(SITES[0])).live[0]
    ex = card.top_examples[0]
    evil = dataclasses.replace(
        ex,
        prompt="<script>alert(1)</script>",
        window=(*ex.window, WindowToken(token_index=10**6, token="<b>&", activation=None)),
    )
    card = dataclasses.replace(card, description="a <i>label</i> | pipe", top_examples=(evil,))
    page = card_html(card)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;&amp;" in page
    assert "<i>label" not in page and 'class="tok hit"' in page
    md = card_markdown(card)
    assert "a <i>label</i> \\| pipe" in md and md.count("**") >= 2


def _activation_file(path: Path, rows: list[tuple[str, str, int, np.ndarray]], group: int) -> Path:
    """An activation file in the writer's schema, ``group`` rows per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = rows[0][3].shape[0]
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "heldout": [False] * len(rows),
            "token_index": pa.array([r[2] for r in rows], pa.int32()),
            "is_post_instruction": [False] * len(rows),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([r[3] for r in rows]).astype(np.float16)), d
            ),
        }
    )
    pq.write_table(table, path, row_group_size=group)
    return path


def test_scan_counts_a_repeated_vector_once_skips_massive_rows_and_leaves_gaps(tmp_path):
    from refusal_assets.features.scan import ActivationSource, scan_site
    from refusal_assets.sae.model import TopKSAE

    sae = TopKSAE(4, 4, 4)  # plain ReLU of x @ I: latent i reads axis i
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_dec.zero_()
    e = np.eye(4, dtype=np.float32)
    template = 3.0 * e[0]  # the same vector at token 0 of every prompt
    rows = [
        ("a", "safe", 0, template),
        ("a", "safe", 1, 1.0 * e[1]),
        ("a", "safe", 3, 2.0 * e[1]),  # token 2 not stored: a gap in the window
        ("b", "toxic", 0, template),
        ("b", "toxic", 1, 50.0 * e[2]),  # massive row: skipped
        ("b", "toxic", 2, 0.5 * e[0]),
    ]
    path = _activation_file(tmp_path / "acts.parquet", rows, group=3)
    scan = scan_site(
        [ActivationSource(path=path, category="cat")],
        sae,
        max_input_norm=10.0,
        n_top=3,
        window_radius=2,
    )
    assert scan.n_rows == 5 and scan.n_massive_rows == 1 and scan.n_distinct_rows == 4
    assert scan.n_fires.tolist() == [3, 2, 0, 0]  # the template fires twice, counted twice
    # latent 0: the template once (rank 1), then b's token 2; a third slot stays empty
    assert scan.top.activation[:, 0].tolist() == pytest.approx([3.0, 0.5, 0.0])
    assert scan.top.row[:, 0].tolist() == [0, 5, -1]
    assert scan.max_activation.tolist() == pytest.approx([3.0, 2.0, 0.0, 0.0])
    # latent 1's best row is a's token 3; its window (tokens 1..5) has token 2 missing
    window = scan.top.window[0, 1]
    assert (
        window[0] == pytest.approx(1.0) and np.isnan(window[1]) and window[2] == pytest.approx(2.0)
    )
    assert np.isnan(window[3:]).all()
    groups = dict(zip(scan.groups, scan.group_rows.tolist()))
    assert groups == {("cat", "safe"): 3, ("cat", "toxic"): 2}
