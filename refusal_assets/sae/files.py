"""SAELens-format SAE folders (``cfg.json`` + ``sae_weights.safetensors``): saving, loading, and
pretrained SAEs from a folder or a SAELens release."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from refusal_assets.config import ModelConfig
from refusal_assets.lm.sites import Site
from refusal_assets.sae.model import TopKSAE
from refusal_assets.storage import atomic_path

WEIGHTS_FILE, CFG_FILE = "sae_weights.safetensors", "cfg.json"
SAELENS_FORMAT = "6.0.0"  # the cfg.json layout we write (flat fields + ``metadata``) is SAELens 6's
TL_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def tl_hook_name(name: str) -> str:
    """TransformerLens hook name of a site (``resid12`` -> ``blocks.12.hook_resid_post``); any other
    name (already a hook name) is returned unchanged."""
    try:
        site = Site.parse(name)
    except ValueError:
        return name
    return f"blocks.{site.layer}.{TL_HOOKS[site.kind]}"


def sae_provenance(
    model_cfg: ModelConfig, max_input_norm: float, max_norm_factor: float
) -> dict[str, Any]:
    """What the SAE's rows were, for ``cfg.json``, with SAELens 6's keys where it has them: the chat
    template and system prompt that rendered the prompts, ``prepend_bos`` False (the rendered text is
    tokenised without added special tokens; a BOS, if any, is the template's own), ``context_size``
    None (each prompt is its own context, of its own length), and the row filter: rows with a norm
    above ``max_input_norm`` (``max_norm_factor`` x the median) were left out, and splicing leaves them
    clean."""
    return {
        "chat_template": f"the tokenizer's own chat template ({model_cfg.id}), with the generation prompt",
        "system_prompt": model_cfg.chat_template.system_prompt,
        "prepend_bos": False,
        "context_size": None,
        "max_input_norm": max_input_norm,
        "max_norm_factor": max_norm_factor,
    }


def save_sae(sae: TopKSAE, folder: Path, cfg_extra: dict[str, Any]) -> Path:
    """Write ``sae_weights.safetensors`` then ``cfg.json`` (last: its presence marks a complete save).

    The input-norm scale is folded into the weights exactly as SAELens 6's trainer does before saving
    (``fold_activation_norm_scaling_factor``: ``W_enc * s``, ``W_dec / s``, ``b_dec / s``), so the file
    takes model-unit inputs with ``normalize_activations: none``; ``(x s - b) W = (x - b/s)(s W)`` and
    ``(z W_dec + b) / s = z (W_dec/s) + b/s`` make latents and reconstructions the same up to rounding.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILE).unlink(
        missing_ok=True
    )  # a crash below must not leave old cfg + new weights
    thresholded = sae.architecture != "topk"
    s = float(sae.norm_scale)
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * s,
            "W_dec": sae.W_dec / s,
            "b_enc": sae.b_enc,
            "b_dec": sae.b_dec / s,
        }
        if thresholded:
            tensors["threshold"] = (
                sae.threshold
            )  # compares pre-activations, which the fold leaves unchanged
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    core = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        # SAELens saves BatchTopK as JumpReLU: at inference both are relu(pre) * (pre > threshold)
        "architecture": "jumprelu" if thresholded else "topk",
        "k": sae.k,
        "normalize_activations": "none",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "dtype": "float32",
        "device": "cpu",
        "reshape_activations": "none",
    }
    clash = {key for key in core if key in cfg_extra and cfg_extra[key] != core[key]}
    if clash:
        raise ValueError(f"cfg_extra contradicts the SAE on {sorted(clash)}")
    extra = dict(cfg_extra)
    if extra.get("hook_name"):
        extra["hook_name"] = tl_hook_name(str(extra["hook_name"]))
    # "folded_norm_scaling_factor" records the fold (informational; the weights already include it)
    metadata = {
        # the cfg.json layout; no "sae_lens_training_version": SAELens did not train this SAE
        "sae_lens_version": SAELENS_FORMAT,
        "hook_name": None,
        "model_name": None,
        **extra,
        "folded_norm_scaling_factor": s,
    }
    cfg = {"hook_name": None, "model_name": None, **extra, **core, "metadata": metadata}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    return folder


def load_sae(folder: Path, d_in: int | None = None) -> TopKSAE:
    """Read a SAELens-format folder (ours or others'): architectures topk, standard (ReLU or a v5
    ``activation_fn_str: topk``), jumprelu / batchtopk, with SAELens's own latents (TopK's
    ``rescale_acts_by_decoder_norm`` is folded into the weights). ``d_in``: the site's width, checked
    before any tensor is read. Never unpickles."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{folder}: missing file {path.name}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
        return cfg[key]

    file_d_in, d_sae = int(need("d_in")), int(need("d_sae"))
    if d_in is not None and file_d_in != d_in:
        raise ValueError(
            f"{cfg_path}: SAE has d_in {file_d_in} but the site's activations have width {d_in}"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: truncated or corrupt safetensors file ({e})") from e
    d_in = file_d_in
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    act_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        if k is None:
            raise ValueError(
                f"{cfg_path}: missing key 'k' (or activation_fn_kwargs.k) for a topk SAE"
            )
        architecture, k = "topk", int(k)
    elif arch == "standard" and act_fn == "relu":
        architecture, k = "topk", d_sae  # plain ReLU: every positive latent is kept
    elif arch in ("jumprelu", "batchtopk"):
        architecture, k = "jumprelu", int(k or d_sae)
    else:
        raise ValueError(f"{cfg_path}: unsupported architecture {arch!r} (activation {act_fn!r})")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: unsupported normalize_activations {norm!r}")
    # SAELens's trainer folds the scale before saving, so a SAELens file means identity here; a file that
    # states its factor (pre-fold releases, our files before the fold) gets it applied, as from_pretrained does
    scale = (
        float(cfg.get("norm_scaling_factor") or 1.0) if norm == "expected_average_only_in" else 1.0
    )

    sae = TopKSAE(
        d_in,
        d_sae,
        k,
        architecture,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
    )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    with torch.no_grad():
        for name, shape in shapes.items():
            getattr(sae, name).copy_(_checked_tensor(weights_path, tensors, name, shape).float())
        if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens ranks pre * ||W_dec_i|| and decodes z / ||W_dec_i||: fold both into the weights
            n = sae.W_dec.norm(dim=-1)
            sae.W_enc.mul_(n)
            sae.b_enc.mul_(n)
            sae.W_dec.div_(n[:, None])
        sae.norm_scale.fill_(scale)
    return sae.eval()


def _checked_tensor(
    weights_path: Path, tensors: dict[str, torch.Tensor], name: str, shape: tuple
) -> torch.Tensor:
    """``tensors[name]`` once it is there, of ``shape``, floating point and finite: a file from
    elsewhere (a user's pretrained folder) fails here, naming the file and the tensor, before any step
    computes with it."""
    if name not in tensors:
        raise ValueError(f"{weights_path}: missing tensor {name!r}")
    tensor = tensors[name]
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"{weights_path}: tensor {name!r} has dtype {tensor.dtype}, expected a floating type"
        )
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{weights_path}: tensor {name!r} has {n_bad} NaN or infinite values")
    return tensor


def load_pretrained(spec: str, d_in: int, resolve: Callable[[str], Path] = Path) -> TopKSAE:
    """A pretrained SAE for a site of width ``d_in``: a SAELens-format folder (``resolve`` turns the
    config's string into a path), or ``saelens:<release>/<sae_id>`` fetched through ``sae_lens``
    (optional extra ``peers``), which folds a release's norm scale as ``from_pretrained`` does."""
    if not spec.startswith("saelens:"):
        return load_sae(resolve(spec), d_in=d_in)
    release, _, sae_id = spec.removeprefix("saelens:").partition("/")
    if not release or not sae_id:
        raise ValueError(f"pretrained {spec!r}: expected saelens:<release>/<sae_id>")
    try:
        from sae_lens import SAE
    except ImportError as e:
        raise ValueError(
            f"pretrained {spec!r} needs the sae-lens package: pip install 'refusal-assets[peers]' ({e})"
        ) from e
    import tempfile

    loaded = SAE.from_pretrained(release, sae_id, device="cpu")
    sae_obj = (
        loaded[0] if isinstance(loaded, tuple) else loaded
    )  # pre-6 versions returned (sae, cfg, sparsity)
    with tempfile.TemporaryDirectory(prefix="saelens-") as tmp:
        sae_obj.save_model(tmp)  # its own file layout, read back by the same loader as any folder
        try:
            return load_sae(Path(tmp), d_in=d_in)
        except ValueError as e:
            raise ValueError(f"pretrained {spec!r}: {e}") from e
