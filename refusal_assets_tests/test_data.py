import polars as pl
import pytest

from refusal_assets.config import SamplingConfig
from refusal_assets.prompts.orbench import DataError, load_orbench, profile, sample_category
from refusal_assets_tests.conftest import ROOT, write_csv

SAMPLE = ROOT / "data" / "orbench_sample"


def test_embedded_sample_has_ten_categories_and_three_splits():
    df, report = load_orbench(SAMPLE)
    counts = df.group_by("category_key", "split").len()
    assert sorted(df["category_key"].unique()) == sorted(
        [
            "deception",
            "harassment",
            "harmful",
            "hate",
            "illegal",
            "privacy",
            "self-harm",
            "sexual",
            "unethical",
            "violence",
        ]
    )
    assert counts["len"].min() >= 12 and counts.height == 30
    assert report.n_dropped_duplicate == 0 and len(report.files) == 3
    assert df["prompt_id"].n_unique() == df.height


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_orbench(tmp_path / "nowhere")


def test_folder_without_split_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="none of the split files"):
        load_orbench(tmp_path)


def test_missing_prompt_column_names_file(tmp_path):
    write_csv(tmp_path / "or-bench-toxic.csv", [("x", "hate")], header="text,category")
    with pytest.raises(DataError) as e:
        load_orbench(tmp_path)
    assert "or-bench-toxic.csv" in str(e.value) and "prompt" in str(e.value)


def test_empty_category_value_names_line(tmp_path):
    write_csv(tmp_path / "or-bench-toxic.csv", [("fine prompt", "hate"), ("orphan prompt", "")])
    with pytest.raises(DataError, match=r"line 3: empty category"):
        load_orbench(tmp_path)


def test_requested_category_without_prompts(tmp_path):
    write_csv(tmp_path / "or-bench-toxic.csv", [("a prompt", "hate")])
    with pytest.raises(DataError, match="violence"):
        load_orbench(tmp_path, categories=["hate", "violence"])


def test_not_utf8_binary_empty_and_bad_quoting(tmp_path):
    bad = tmp_path / "a"
    bad.mkdir()
    (bad / "or-bench-toxic.csv").write_bytes(b"prompt,category\n\xff\xfe bad,hate\n")
    with pytest.raises(DataError, match="not valid UTF-8 at line 2"):
        load_orbench(bad)
    (bad / "or-bench-toxic.csv").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="binary"):
        load_orbench(bad)
    (bad / "or-bench-toxic.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_orbench(bad)
    (bad / "or-bench-toxic.csv").write_text('prompt,category\n"unclosed quote, hate\nnext,hate\n')
    with pytest.raises(DataError, match="or-bench-toxic.csv"):
        load_orbench(bad)
    (bad / "or-bench-toxic.csv").write_text("prompt,category\na,b,c,d\n")
    with pytest.raises(DataError, match="more fields than the header"):
        load_orbench(bad)


def test_empty_prompts_dropped_and_duplicates_resolved(tmp_path):
    write_csv(
        tmp_path / "or-bench-80k.csv",
        [("same prompt", "Hate Speech"), ("safe one", "Hate Speech"), ("", "Hate Speech")],
    )
    write_csv(
        tmp_path / "or-bench-hard-1k.csv",
        [("same prompt", "Hate Speech"), ("same prompt", "Hate Speech")],
    )
    df, report = load_orbench(tmp_path)
    assert report.n_dropped_empty == 1 and report.n_dropped_duplicate == 2
    row = df.filter(pl.col("prompt") == "same prompt")
    assert row.height == 1 and row["split"][0] == "hard"  # the more specific split wins
    assert df["category_key"].unique().to_list() == ["hate-speech"]


def test_unsafe_category_cannot_escape_storage(tmp_path):
    write_csv(tmp_path / "or-bench-toxic.csv", [("p", "../../etc")])
    with pytest.raises(ValueError, match="unsafe category"):
        load_orbench(tmp_path)


def test_sample_is_seeded_balanced_and_heldout_disjoint():
    df, _ = load_orbench(SAMPLE)
    a = sample_category(
        df, "hate", SamplingConfig(mode="equalize", max_per_cell=10), seed=3, heldout_fraction=0.3
    )
    b = sample_category(
        df, "hate", SamplingConfig(mode="equalize", max_per_cell=10), seed=3, heldout_fraction=0.3
    )
    c = sample_category(
        df, "hate", SamplingConfig(mode="equalize", max_per_cell=10), seed=4, heldout_fraction=0.3
    )
    assert a.equals(b) and not a.equals(c)
    assert a.group_by("split").len()["len"].to_list() == [10, 10, 10]
    assert a.filter(pl.col("heldout")).height == 9


def test_profile_warns_about_imbalance():
    raw = pl.DataFrame(
        {
            "category_key": ["a", "a", "a", "b", "b"],
            "split": ["safe", "hard", "toxic", "safe", "toxic"],
            "n": [100, 20, 100, 5, 5],
        },
        schema_overrides={"n": pl.UInt32},
    )
    prof = profile(raw, raw)
    text = "\n".join(prof.warnings)
    assert (
        "a: split imbalance" in text
        and "b: no 'hard' prompts" in text
        and "b: only 5 'safe'" in text
    )
