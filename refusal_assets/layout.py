"""Where every asset's files live, with their readers: the one place a storage path is spelled.

``<root>/<asset>/<partition parts>/<file>``; assets, the report and tests reach files only through
a :class:`Layout`, so moving a file is one edit here (and no asset module imports another for a
path). Writers stay the atomic helpers of :mod:`refusal_assets.storage`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from safetensors.torch import load_file

from refusal_assets.storage import Storage, read_parquet


def replicate_effects_key(group: str, seed: int) -> str:
    """``effects.safetensors``' key of a prompt group's node effects through the extra SAE training
    of seed ``seed`` (``sae.replicates``); the main SAEs' are ``effects_<group>``."""
    return f"effects_{group}_sae_seed{seed}"


class Layout:
    """Paths of one storage root, one method per asset file (folders for multi-file assets)."""

    def __init__(self, files: Storage | str | Path):
        self.files = files if isinstance(files, Storage) else Storage(files)

    # ---- stage 1: data
    def prompts(self, category: str) -> Path:
        return self.files.path("orbench_prompts", category, filename="prompts.parquet")

    def sample(self, category: str) -> Path:
        return self.files.path("prompt_sample", category, filename="sample.parquet")

    def data_profile(self) -> Path:
        return self.files.path("data_profile")

    def profile_table(self) -> Path:
        return self.data_profile() / "profile.parquet"

    def profile_plot(self) -> Path:
        return self.data_profile() / "profile.png"

    def load_prompts(self, category: str) -> pl.DataFrame:
        return pl.from_arrow(read_parquet(self.prompts(category)))

    def load_sample(self, category: str) -> pl.DataFrame:
        return pl.from_arrow(read_parquet(self.sample(category), "prompt sample"))

    # ---- stage 2: behaviour and activations
    def behaviour_folder(self, model_key: str, category: str) -> Path:
        return self.files.path("refusal_behaviour", model_key, category)

    def behaviour(self, model_key: str, category: str) -> Path:
        return self.behaviour_folder(model_key, category) / "behaviour.parquet"

    def behaviour_plot(self, model_key: str, category: str) -> Path:
        return self.behaviour_folder(model_key, category) / "refusal_rates.png"

    def load_behaviour(self, model_key: str, category: str) -> pl.DataFrame:
        """The ``refused`` judgement and refusal score of each sampled prompt."""
        path = self.behaviour(model_key, category)
        return pl.from_arrow(read_parquet(path, "refusal behaviour")).select(
            "prompt_id", "refused", "refusal_score"
        )

    def activations(self, site_key: str, category: str) -> Path:
        return self.files.path("activations", site_key, category, filename="activations.parquet")

    # ---- stage 3: SAEs
    def sae_corpus_activations(self, site_key: str) -> Path:
        """One site's activations of the SAE training corpus (``sae.corpus``), same schema as :meth:`activations`."""
        return self.files.path("sae_corpus_activations", site_key, filename="activations.parquet")

    def sae(self, site_key: str) -> Path:
        """The SAELens-layout folder (cfg.json + sae_weights.safetensors) of one site."""
        return self.files.path("sae", site_key)

    def sae_replicate(self, site_key: str, seed: int) -> Path:
        """The SAELens-layout folder of one extra training of a site's SAE (``sae.replicates``)."""
        return self.sae(site_key) / "replicates" / f"seed{seed}"

    SAE_HISTORY, SAE_PLOT = "history.json", "training.png"

    def sae_history(self, site_key: str) -> Path:
        return self.sae(site_key) / self.SAE_HISTORY

    def sae_plot(self, site_key: str) -> Path:
        return self.sae(site_key) / self.SAE_PLOT

    # ---- stage 3b: feature cards (refusal_assets.features.files documents the files)
    def features(self, site_key: str) -> Path:
        return self.files.path("features", site_key)

    def feature_top_examples(self, site_key: str) -> Path:
        return self.features(site_key) / "top_examples.parquet"

    def feature_latents(self, site_key: str) -> Path:
        return self.features(site_key) / "latents.parquet"

    def feature_cards(self, site_key: str) -> Path:
        """One JSON file per site (layout: refusal_assets.features.cards); written last."""
        return self.features(site_key) / "cards.json"

    # ---- stage 3c: execution level (refusal_assets.directions documents the files)
    def refusal_direction(self, model_key: str) -> Path:
        return self.files.path("refusal_direction", model_key)

    def direction_tensors(self, model_key: str) -> Path:
        """``pooled.layer{L}`` [d_model]: the pooled direction at block L's input (= site
        ``resid{L-1}``'s output), every L in 0..n_layers; ``category.{c}``; ``random``."""
        return self.refusal_direction(model_key) / "directions.safetensors"

    def direction_result(self, model_key: str) -> Path:
        """:class:`refusal_assets.directions.result.ExecutionResult` as JSON; written last."""
        return self.refusal_direction(model_key) / "result.json"

    def direction_examples(self, model_key: str) -> Path:
        return self.refusal_direction(model_key) / "examples.json"

    def direction_plot(self, model_key: str, name: str) -> Path:
        return self.refusal_direction(model_key) / f"{name}.png"

    def load_execution_verdict(self, model_key: str) -> tuple[str, str]:
        """(verdict_execution, its reason) of the ``refusal_direction`` asset, or "insufficient
        evidence" with the reason that it has not been materialized."""
        from refusal_assets.directions.result import read_result

        path = self.direction_result(model_key)
        if not path.is_file():
            return "insufficient evidence", f"{path} not found (refusal_direction not materialized)"
        result = read_result(path)
        return result.verdict_execution, result.verdict_reason

    def load_pooled_direction(self, model_key: str, layer: int) -> np.ndarray | None:
        """The pooled refusal direction [d_model] at block ``layer``'s input (an SAE at site
        ``resid{i}`` reads layer i + 1), or None where none was found (too few refusing prompts)."""
        path = self.direction_tensors(model_key)
        if not path.is_file():
            raise FileNotFoundError(
                f"refusal direction not found: {path} (materialize refusal_direction first)"
            )
        tensors = load_file(str(path))
        key = f"pooled.layer{layer}"
        return tensors[key].numpy() if key in tensors else None

    # ---- stage 4: circuits
    def circuit(self, model_key: str, category: str) -> Path:
        return self.files.path("circuit", model_key, category)

    def circuit_summary(self, model_key: str, category: str) -> Path:
        """Written last: its presence marks a complete partition."""
        return self.circuit(model_key, category) / "circuit.json"

    def circuit_tensors(self, model_key: str, category: str) -> Path:
        return self.circuit(model_key, category) / "effects.safetensors"

    def circuit_plot(self, model_key: str, category: str) -> Path:
        return self.circuit(model_key, category) / "faithfulness.png"

    def load_circuit(self, model_key: str, category: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(circuit.json, {tensor name: array}) of one circuit partition; a missing or broken one is a clear error."""
        path, tensors_path = (
            self.circuit_summary(model_key, category),
            self.circuit_tensors(model_key, category),
        )
        if not path.is_file():
            raise FileNotFoundError(
                f"circuit not found: {path} (materialize circuit {category}|{model_key} first)"
            )
        try:
            tensors = {k: v.numpy() for k, v in load_file(str(tensors_path)).items()}
        except Exception as e:
            raise ValueError(
                f"{tensors_path}: unreadable ({e}); rematerialize this circuit partition"
            ) from e
        return json.loads(path.read_text()), tensors

    # ---- stage 5: comparison and report
    def comparison(self, model_key: str) -> Path:
        return self.files.path("comparison", model_key)

    def comparison_summary(self, model_key: str) -> Path:
        return self.comparison(model_key) / "comparison.json"

    def jaccard_plot(self, model_key: str, group: str) -> Path:
        return self.comparison(model_key) / f"jaccard_{group}.png"

    def direction_cosine_plot(self, model_key: str, site: str) -> Path:
        return self.comparison(model_key) / f"direction_cosine_{site}.png"

    def transfer(self, model_key: str) -> Path:
        return self.files.path("transfer", model_key)

    def transfer_summary(self, model_key: str) -> Path:
        """Written last: its presence marks a complete partition."""
        return self.transfer(model_key) / "transfer.json"

    def transfer_plot(self, model_key: str, test: str) -> Path:
        return self.transfer(model_key) / f"{test}.png"

    def load_transfer(self, model_key: str) -> dict | None:
        """transfer.json of one model, or None where the functional tests did not run."""
        path = self.transfer_summary(model_key)
        return json.loads(path.read_text()) if path.is_file() else None

    def report(self) -> Path:
        return self.files.path("report")

    def report_html(self) -> Path:
        """Self-contained (figures embedded)."""
        return self.report() / "report.html"

    def report_markdown(self) -> Path:
        """Its figures are files in ``report_figures()``."""
        return self.report() / "report.md"

    def report_figures(self) -> Path:
        return self.report() / "figures"
