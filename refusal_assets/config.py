"""Validated YAML configuration.

A *project config* (e.g. ``configs/default.yaml``) names one data config, any number of model
configs, one SAE config and one circuit config. Each section is either a path to another YAML file
(relative to the project root, the folder that holds ``configs/``) or an inline mapping. Every
error names the file and the key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refusal_assets.lm.sites import Site, expand_sites

SAFE_KEY = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
SPLIT_FILES = {
    "safe": "or-bench-80k.csv",
    "hard": "or-bench-hard-1k.csv",
    "toxic": "or-bench-toxic.csv",
}
DEFAULT_REFUSAL_PHRASES = [
    "I'm sorry",
    "I am sorry",
    "I cannot",
    "I can't",
    "I can not",
    "As an AI",
    "I apologize",
    "I won't",
    "I will not",
    "Sorry",
    "Unfortunately",
]


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def model_key_from_id(model_id: str) -> str:
    """A storage- and partition-safe key: no ``/ | , [ ]``, no ``..``, no ``__`` (the site separator)."""
    key = re.sub(r"[^a-z0-9.\-]+", "-", model_id.split("/")[-1].lower()).strip("-.")
    key = re.sub(r"-{2,}", "-", key.replace("..", "."))
    if not key or not SAFE_KEY.match(key):
        raise ValueError(f"cannot derive a safe key from model id {model_id!r}")
    return key


# ----------------------------------------------------------------------------------------- data
class SamplingConfig(_Strict):
    mode: Literal["use_all", "equalize"] = "equalize"
    """use_all: every prompt; equalize: the same number per (category, split), the smallest cell's size."""
    max_per_cell: int | None = Field(default=None, ge=1)
    """Upper bound on prompts per (category, split) after equalizing; None = no bound."""


class DataConfig(_Strict):
    source: Literal["local", "hub"] = "local"
    path: str = "data/orbench_sample"
    """Folder in OR-Bench layout (local source)."""
    hub_dataset: str = "bench-llm/or-bench"
    cache_dir: str = "data/raw"
    splits: list[Literal["safe", "hard", "toxic"]] = ["safe", "hard", "toxic"]
    categories: list[str] | None = None
    """Restrict to these categories; None = every category found in the data."""
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    heldout_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)

    @field_validator("categories")
    @classmethod
    def _safe_categories(cls, v: list[str] | None) -> list[str] | None:
        from refusal_assets.storage import category_key

        for c in v or []:
            category_key(c)  # raises on a name that would escape the storage folder
        if v is not None and not v:
            raise ValueError(
                "an empty list of categories selects nothing; omit the key to take every category"
            )
        return v

    @field_validator("splits")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one split is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate splits in {v}")
        return v


# --------------------------------------------------------------------------------------- models
class ArchitectureConfig(_Strict):
    n_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(default=32, ge=1)
    stop_when_judged: bool = True
    """Stop a response as soon as it contains a refusal phrase: its judgement can no longer change,
    so the remaining tokens cost time and decide nothing (the stored response then ends at the
    phrase; ``stop_reason`` says "judged"). False = every response runs to EOS or max_new_tokens."""
    decode_batch_size: int = Field(default=128, ge=1)
    """Rows decoded together: prompts are prefilled in chunks of the model's ``batch_size``, then up
    to this many decoded as one batch (a decode step costs about the same for 8 rows as for 64, so
    fewer, fuller steps are faster; the KV cache of these rows must fit in memory)."""


class ChatTemplateConfig(_Strict):
    system_prompt: str | None = None
    """None = the model's own default (whatever its chat template does without a system turn)."""


class RefusalConfig(_Strict):
    phrases: list[str] = DEFAULT_REFUSAL_PHRASES
    refusal_tokens: list[str] | None = None
    """Tokens whose next-token probability mass is p_ref; None = first tokens of ``phrases``."""

    @field_validator("phrases")
    @classmethod
    def _phrases(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("refusal phrases must be a non-empty list of non-empty strings")
        return v


class ModelConfig(_Strict):
    id: str
    """Display name; also the hub id for ``source: hub`` unless ``path`` is given."""
    key: str | None = None
    """Partition / storage key; derived from ``id`` when absent."""
    source: Literal["packaged", "hub", "local", "gguf", "tiny"]
    path: str | None = None
    """hub: repo id (default ``id``); local: HF folder; gguf: the .gguf file; tiny: cache folder."""
    revision: str | None = None
    architecture: ArchitectureConfig
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=8, ge=1)
    chat_template: ChatTemplateConfig = ChatTemplateConfig()
    generation: GenerationConfig = GenerationConfig()
    refusal: RefusalConfig = RefusalConfig()
    activation_layers: list[str] = Field(min_length=1)
    """Seed shorthand: ``all``, ``residuals_0-31``, ``residuals_10-``, ``residuals_all``,
    ``mlp_all``, ``attention_all``, ``residuals_5`` ...; expanded against ``architecture.n_layers``."""
    all_token_positions: bool = True
    """Also store every prompt token (SAE training data), not only the post-instruction ones."""
    trust_remote_code: bool = False

    @field_validator("key")
    @classmethod
    def _safe_key(cls, v: str | None) -> str | None:
        if v is not None and (not SAFE_KEY.match(v) or "__" in v or ".." in v):
            raise ValueError(f"model key {v!r} must match {SAFE_KEY.pattern} without '__' or '..'")
        return v

    @model_validator(mode="after")
    def _sites_in_range(self) -> "ModelConfig":
        expand_sites(self.activation_layers, self.architecture.n_layers)  # raises on bad layers
        if self.source in ("local", "gguf") and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path'")
        if self.key is None:
            model_key_from_id(self.id)  # raises when no safe key can be derived
        return self

    @property
    def model_key(self) -> str:
        return self.key or model_key_from_id(self.id)

    @property
    def sites(self) -> list[Site]:
        return expand_sites(self.activation_layers, self.architecture.n_layers)

    @property
    def site_keys(self) -> list[str]:
        return [f"{self.model_key}__{s.name}" for s in self.sites]


# ------------------------------------------------------------------------------------------ SAE
class SAEQualityThresholds(_Strict):
    max_fvu: float = 0.5
    max_dead_fraction: float = 0.5


class SpliceEvalConfig(_Strict):
    """How the SAE asset measures loss recovered: the model run with the SAE spliced in."""

    prompts_per_category: int = Field(default=2, ge=1)
    """Held-out prompts per category to score (the first ones of each category's sample)."""
    batch_size: int = Field(default=8, ge=1)


class SAECorpusConfig(_Strict):
    """Extra prompts whose activations only train the SAEs (never held out, never studied).

    SAEs in the field are trained on far more text than a study's prompts: on the embedded sample's
    ~6k distinct rows per site the held-out FVU is limited by data (``bench sae --learning-curve``).
    The corpus prompts go through the same chat template as the study's; a corpus prompt equal to a
    study prompt is dropped, so no held-out prompt is trained on."""

    path: str
    """A CSV file with a ``prompt`` column (other columns are ignored; OR-Bench's files qualify),
    or a folder whose ``*.csv`` files all are read. Relative to the project root."""
    max_prompts: int | None = Field(default=None, ge=1)
    """Use a seeded random subset of this many prompts (``null`` = all of them)."""
    seed: int = 0


class SAEReplicatesConfig(_Strict):
    """Extra SAE trainings per site, one per seed, for the feature-level answer's stability.

    A dictionary is one draw of a non-convex fit: another seed (initialisation and batch order) can
    split or merge latents, and with them the circuits. Each replicate trains on the same rows and
    split as the main SAE; the circuits read every replicate in the same gradient pass, and the
    comparison repeats the feature-level test per training (``verdict_features_by_seed``). The main
    SAE alone serves everything else (cards, faithfulness, transfer)."""

    seeds: list[int] = []
    """Seeds of the extra trainings (empty: the main SAE alone, one training deep)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Steps of each extra training (``null``: ``sae.max_steps``); shorter keeps the main job's time."""
    lr_decay_steps: int | None = Field(default=None, ge=0)
    """Its learning-rate decay steps (``null``: ``sae.lr_decay_steps``, capped at ``max_steps``)."""

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v


class SAEConfig(_Strict):
    architecture: Literal["topk", "batchtopk"] = "topk"
    expansion_factor: int = Field(default=8, ge=1)
    k: int = Field(default=32, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    lr_decay_steps: int = Field(default=0, ge=0)
    """The last this-many of ``max_steps`` decay the learning rate linearly to 0 (SAELens's
    ``lr_decay_steps``); 0 = constant."""
    tied_encoder: bool = False
    """Train the encoder as the decoder's transpose times one scale per latent (``sae.TiedEncoder``):
    it generalises far better on the few thousand distinct rows of a small sample; the saved SAE is
    an ordinary untied one either way."""
    batch_size: int = Field(default=1024, ge=1)
    max_steps: int = Field(default=2000, ge=1)
    aux_k: int = Field(default=256, ge=1)
    aux_coef: float = Field(default=1 / 32, ge=0)
    dead_after_tokens: int = Field(default=50_000, ge=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of the prompts whose rows decide early stopping (never trained on)."""
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of the prompts held out for the reported metrics (FVU, dead fraction, splice): neither
    trained on nor used for early stopping, so the numbers are not tuned on their own data."""
    eval_every: int = Field(default=100, ge=1)
    patience: int = Field(default=5, ge=1)
    """Early stopping: evaluations without validation-FVU improvement before stopping."""
    max_norm_factor: float = Field(default=3.0, gt=1)
    """Rows with a norm above this multiple of the site's median norm are left out of training,
    evaluation and splicing: the "massive activations" of attention-sink tokens (Sun et al. 2024),
    orders of magnitude larger than the rest, would otherwise dominate the scale and the FVU."""
    seed: int = 0
    thresholds: SAEQualityThresholds = SAEQualityThresholds()
    pretrained: dict[str, str] = {}
    """site key -> SAELens-format folder to load instead of training."""
    splice: SpliceEvalConfig = SpliceEvalConfig()
    template_repeats: int = Field(default=1, ge=1)
    """Draws per epoch of each distinct template vector (a vector found in more than one prompt: the
    system prompt and chat header). 1 = every distinct vector once. Next to a large corpus the ~60
    template vectors are a tiny share of the rows, yet every prompt's splice passes through them."""
    corpus: SAECorpusConfig | None = None
    """Extra training prompts for the SAEs (asset ``sae_corpus_activations``); ``null`` = the study's
    prompts only."""
    train_categories: list[str] | None = None
    """Categories whose activations train the SAEs. A pinned list keeps the SAEs (and so every
    circuit) as they are when a category is added: the new category gets its own prompts,
    behaviour, activations and circuits, read through the existing SAEs. ``null`` = every category
    of the config: then adding a category retrains every SAE and reruns every circuit."""

    @field_validator("train_categories")
    @classmethod
    def _train_categories(cls, v: list[str] | None) -> list[str] | None:
        from refusal_assets.storage import category_key

        if v is not None and not v:
            raise ValueError(
                "an empty list trains the SAEs on nothing; omit the key (null) to train on every category"
            )
        for c in v or []:
            category_key(c)
        return v

    replicates: SAEReplicatesConfig = SAEReplicatesConfig()
    """Extra trainings per site with other seeds (the feature-level answer's stability)."""

    def replicate(self, seed: int) -> "SAEConfig":
        """This config as one extra training of ``replicates`` trains: its seed and step budget."""
        steps = self.replicates.max_steps or self.max_steps
        decay = self.replicates.lr_decay_steps
        decay = min(self.lr_decay_steps if decay is None else decay, steps)
        return self.model_copy(update={"seed": seed, "max_steps": steps, "lr_decay_steps": decay})

    @model_validator(mode="after")
    def _split(self) -> "SAEConfig":
        if self.seed in self.replicates.seeds:
            raise ValueError(
                f"sae.replicates.seeds {self.replicates.seeds} include sae.seed {self.seed}: "
                "a replicate must be another training"
            )
        if self.val_fraction + self.eval_fraction >= 1:
            raise ValueError(
                f"sae.val_fraction ({self.val_fraction}) + sae.eval_fraction ({self.eval_fraction}) must be < 1: "
                "some prompts must be left to train on"
            )
        return self


# ------------------------------------------------------------------------------------- circuits
class CircuitConfig(_Strict):
    method: Literal["attribution", "integrated_gradients"] = "attribution"
    ig_steps: int = Field(default=10, ge=1)
    selection: Literal["topk", "threshold", "topk_abs", "threshold_abs"] = "topk"
    """``topk``/``threshold`` on the signed effect (refusal-promoting nodes); ``*_abs`` on its magnitude."""
    k_per_site: int = Field(default=20, ge=1)
    threshold: float = Field(default=0.05, ge=0)
    separate_safe_toxic: bool = True
    edges: bool = True
    max_edges: int = Field(default=200, ge=0)
    edge_targets_per_site: int = Field(default=10, ge=1)
    """Downstream latents per site pair whose incoming edges are computed (one backward each)."""
    eval_sizes: list[int] = [1, 2, 5, 10, 20, 50]
    """Nodes per site for the faithfulness sweep."""
    prompt_filter: Literal["score_positive", "refused", "all"] = "score_positive"
    """Which prompts a circuit is found and evaluated on: ``score_positive`` = refusal score > 0, the
    metric itself says the model refuses (Arditi et al.'s filter); ``refused`` = the phrase judgement
    of ``refusal_behaviour`` (includes hesitant refusals whose first-token score stays below 0);
    ``all`` = every prompt of the group. With a filter the mean-ablation baseline is the safe
    prompts the model did NOT refuse, so m(M) - m(∅) measures refusal against compliance."""
    min_prompts: int = Field(default=2, ge=2)
    """Fewer filtered prompts than this in a group (cross-fitting needs two): that group falls back
    to all its prompts, logged and recorded as ``prompt_set``."""
    n_folds: int = Field(default=0, ge=0)
    """Cross-fitting for faithfulness: 0 = leave-one-out, k >= 2 = k folds. Every prompt is scored
    with a circuit selected on the other folds only."""
    n_bootstrap: int = Field(default=1000, ge=0)
    """Bootstrap resamples (over prompts) for the faithfulness / completeness CIs; 0 = none."""
    seed: int = 0

    @field_validator("n_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError(
                "n_folds must be 0 (leave-one-out) or at least 2: one fold leaves nothing to select a circuit on"
            )
        return v


class ComparisonConfig(_Strict):
    n_permutations: int = Field(default=500, ge=10)
    n_bootstrap: int = Field(default=500, ge=10)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    seed: int = 0
    n_splits: int = Field(default=4, ge=1)
    """Half-sample splits per pair (and per bootstrap resample) for the normalised Jaccard."""
    min_ceiling: float = Field(default=0.2, ge=0, le=1)
    """Below this within-category split-half Jaccard a pair is not normalised (noise circuits)."""
    equivalence_margin: float = Field(default=0.2, gt=0, lt=1)
    """Shared = the cross-category statistic's CI lies within this margin of the within-category
    ceiling (normalised CI low >= 1 - margin; transfer CI low >= 1 - margin)."""
    modular_max_normalised: float = Field(default=0.5, gt=0, lt=1)
    """Specific = significant and the normalised CI high below this (transfer CI high below it)."""
    min_decided_fraction: float = Field(default=0.5, gt=0, le=1)
    """Fewer decided pairs than this fraction: insufficient evidence."""
    majority: float = Field(default=0.5, gt=0, le=1)
    """Fraction of decided pairs that must agree for modular / monolithic."""
    transfer: bool = True
    """Run the functional tests (asset ``transfer``: circuit transfer and faithfulness); off leaves
    the verdict to circuit overlap."""


class DirectionsConfig(_Strict):
    """The execution level (asset ``refusal_direction``, Arditi et al. 2024): candidate grid,
    selection filters, generation under ablation, steering coefficients and the verdict margin."""

    layer_stride: int = Field(default=3, ge=1)
    """Candidate layers: every ``layer_stride``-th block input below ``max_layer_fraction`` x L,
    counted down from the deepest allowed one (each candidate costs two scoring passes)."""
    positions: int = Field(default=1, ge=1)
    """Candidate positions: the last ``positions`` post-instruction (end-of-instruction) tokens."""
    max_layer_fraction: float = Field(default=0.8, gt=0, le=1)
    val_fraction: float = Field(default=0.35, gt=0, lt=1)
    """Share of the non-held-out prompts that select the direction (the rest give the candidates)."""
    selection_prompts: int = Field(default=16, ge=2)
    """At most this many validation prompts per side (harmful, harmless) score each candidate."""
    min_selection_prompts: int = Field(default=6, ge=2)
    """A category with fewer refusing validation prompts takes the pooled layer and position."""
    kl_threshold: float = Field(default=0.1, gt=0)
    induce_threshold: float = 0.0
    min_relative_norm: float = Field(default=0.05, ge=0)
    """Discard a candidate whose norm is below this fraction of the mean activation norm there."""
    max_new_tokens: int = Field(default=24, ge=1)
    steering_coefficients: list[float] = [0.5, 1.0, 2.0]
    steering_prompts: int = Field(default=16, ge=2)
    """Held-out prompts per side (toxic; safe + hard) for the steering trade-off."""
    margin: float = Field(default=0.25, gt=0, lt=0.5)
    """Shared: still-refusing CI high <= margin; specific: CI low >= 1 - margin."""
    min_category_prompts: int = Field(default=4, ge=1)
    """Refusing prompts a category needs for its leave-one-out call."""
    ratio_floor: float = Field(default=0.5, ge=0)
    """A score-drop ratio is printed only when its denominator exceeds this and its CI excludes 0."""
    n_examples: int = Field(default=6, ge=0)
    seed: int = 0


class ReportConfig(_Strict):
    schedule: str = "0 6 * * *"
    """Cron for the scheduled refresh: one ``comparison`` run per model, then the report follows."""


class AutomationConfig(_Strict):
    build_missing_roots: bool = False
    """Let the automation sensor build never-materialized root assets (``orbench_prompts``) on its
    own, so a fresh instance with the UI running builds the whole graph unattended. Off by default:
    the first build is a deliberate ``refusal-assets run`` or a UI materialization, and automation
    then only keeps what exists up to date."""


class ProjectConfig(_Strict):
    name: str = "default"
    """Names the storage folder ``storage/<name>``: a safe key, never a path."""
    data: DataConfig
    models: list[ModelConfig] = Field(min_length=1)
    sae: SAEConfig = SAEConfig()
    circuits: CircuitConfig = CircuitConfig()
    comparison: ComparisonConfig = ComparisonConfig()
    directions: DirectionsConfig = DirectionsConfig()
    report: ReportConfig = ReportConfig()
    automation: AutomationConfig = AutomationConfig()
    root: Path = Path(".")
    """Project root; relative paths in the config resolve against it (set by the loader)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_KEY.match(v) or ".." in v:
            raise ValueError(
                f"name {v!r} must match {SAFE_KEY.pattern} (it names a folder under storage/)"
            )
        return v

    @model_validator(mode="after")
    def _unique_model_keys(self) -> "ProjectConfig":
        keys = [m.model_key for m in self.models]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"two models share the key(s) {dupes}; set 'key' on one of them")
        return self

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    def model(self, model_key: str) -> ModelConfig:
        for m in self.models:
            if m.model_key == model_key:
                return m
        raise KeyError(
            f"no model with key {model_key!r}; known: {[m.model_key for m in self.models]}"
        )

    def site_keys(self) -> list[str]:
        return [s for m in self.models for s in m.site_keys]

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named config sections: an asset's ``code_version``.

        Only settings that change an output are hashed (see :data:`NOT_HASHED`): check thresholds
        and batch sizes are speed or judgement knobs, so editing them rebuilds nothing. The data
        section leaves out ``categories`` (they are partition keys: adding one adds partitions),
        and ``models`` is never a section: each model's settings are the data version of its own
        ``model_config`` / ``site_config`` source partition (:meth:`model_hash`), so editing one
        model stales only that model's partitions.
        """
        payload: dict[str, Any] = {}
        for name in sections:
            if name == "models":
                raise ValueError(
                    "the models section is hashed per model (ProjectConfig.model_hash), not as a code version"
                )
            payload[name] = getattr(self, name).model_dump(
                mode="json", exclude=NOT_HASHED.get(name)
            )
            if name == "sae" and self.sae.splice == SpliceEvalConfig(
                batch_size=self.sae.splice.batch_size
            ):
                # the splice settings were hard-coded before they were config: at their defaults they
                # leave the SAE code version as it was, so existing SAEs are not rebuilt for nothing
                payload[name].pop("splice", None)
            if name == "sae" and self.sae.corpus is None:
                payload[name].pop(
                    "corpus", None
                )  # absent = the hash SAEs had before the field existed
            if name == "sae" and self.sae.lr_decay_steps == 0:
                payload[name].pop("lr_decay_steps", None)  # likewise
            if name == "sae" and self.sae.template_repeats == 1:
                payload[name].pop("template_repeats", None)  # likewise
            if name == "sae" and self.sae.train_categories is None:
                payload[name].pop(
                    "train_categories", None
                )  # absent = the hash SAEs had before the field existed
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def model_hash(
        self, model_key: str, part: Literal["behaviour", "activations"] = "behaviour"
    ) -> str:
        """One model's output-relevant settings, hashed: the data version of its ``model_config``
        partition (``behaviour``: everything that changes a generation, a refusal judgement or a
        circuit) or of its sites' ``site_config`` partitions (``activations``: only what changes an
        activation vector, so a new ``max_new_tokens`` or refusal phrase does not re-extract
        activations and retrain SAEs). ``activation_layers`` are partition keys and ``batch_size``
        only sets speed, so neither is hashed."""
        m = self.model(model_key)
        exclude: set[str] = {"activation_layers", "batch_size"}
        if part == "activations":
            exclude |= {"generation", "refusal"}
        blob = json.dumps(m.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


NOT_HASHED: dict[str, Any] = {
    # partition keys, not settings of an output
    "data": {"categories"},
    # read only by the asset checks / speed only (the splice batch size scores the same prompts)
    "sae": {"thresholds": True, "splice": {"batch_size"}},
}
"""Per section, the fields that stay out of its code version (a pydantic ``exclude``)."""


# --------------------------------------------------------------------------------------- loading
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """The same key twice in one YAML mapping (PyYAML would silently keep the last one)."""

    def __init__(self, key: Any, path: str, line: int, first_line: int):
        self.key, self.path, self.line, self.first_line = key, path, line, first_line
        dotted = f"{path}.{key}" if path else str(key)
        super().__init__(
            problem=f"duplicate key '{dotted}' on line {line} (first on line {first_line})"
        )

    def __str__(self) -> str:
        return self.problem


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics (same tags, no python/* objects) that refuse a key given twice
    in one mapping, e.g. two ``sae:`` sections, where PyYAML keeps the last one without a word.

    Keys merged in with ``<<: *anchor`` may be overridden: that is what merge keys are for.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._document = node  # to name the dotted path of a duplicate, only when there is one
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_lines:
                        raise DuplicateKeyError(key, self._path_to(node), line, first_lines[key])
                    first_lines[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
        return super().construct_mapping(node, deep=deep)

    def _path_to(self, target: yaml.Node) -> str:
        """Dotted path of ``target`` from the document root ("sae", "models.0.chat_template")."""

        def walk(node: yaml.Node, path: list[str]) -> list[str] | None:
            if node is target:
                return path
            if isinstance(node, yaml.MappingNode):
                children = [(str(getattr(k, "value", "?")), v) for k, v in node.value]
            elif isinstance(node, yaml.SequenceNode):
                children = [(str(i), v) for i, v in enumerate(node.value)]
            else:
                return None
            for name, child in children:
                if (found := walk(child, [*path, name])) is not None:
                    return found
            return None

        return ".".join(walk(getattr(self, "_document", target), []) or [])


def read_yaml(path: Path) -> Any:
    """One YAML file as Python data, with ``safe_load`` semantics and duplicate keys refused.
    Every YAML file the project reads should come through here (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:  # includes python/object tags refused by safe_load
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


def _project_root_for(config_path: Path) -> Path:
    config_path = config_path.resolve()
    for parent in config_path.parents:
        if parent.name == "configs":
            return parent.parent
    return config_path.parent


def _format_error(err: dict[str, Any], sources: dict[tuple, Path], default: Path) -> str:
    loc = tuple(err["loc"])
    source = default
    for n in range(len(loc), 0, -1):  # the most specific file that the failing key came from
        if loc[:n] in sources:
            source, loc = sources[loc[:n]], loc[n:]
            break
    key = ".".join(str(p) for p in loc) or "(top level)"
    return f"{source}: key '{key}': {err['msg']}"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Load and validate a project config; ``overrides`` are dotted keys, e.g. ``{"data.path": d}``."""
    path = Path(path)
    root = _project_root_for(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    sources: dict[tuple, Path] = {}

    def include(value: Any, loc: tuple) -> Any:
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            sub = Path(value) if Path(value).is_absolute() else root / "configs" / value
            if not sub.is_file() and (root / value).is_file():
                sub = root / value
            loaded = read_yaml(sub)
            sources[loc] = sub
            if not isinstance(loaded, dict):
                raise ConfigError(f"{sub}: expected a mapping, got {type(loaded).__name__}")
            return loaded
        return value

    for section in ("data", "sae", "circuits", "comparison", "report", "automation"):
        if section in raw:
            raw[section] = include(raw[section], (section,))
    if isinstance(raw.get("models"), list):
        raw["models"] = [include(m, ("models", i)) for i, m in enumerate(raw["models"])]
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    raw["root"] = str(root)
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_format_error(err, sources, path) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
