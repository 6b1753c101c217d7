"""Hook sites: the seed's layer shorthand and where each site lives in a decoder-only model.

A site is one hook point, named ``resid{i}`` (residual stream after block i), ``mlp{i}`` (the MLP
output of block i) or ``attn{i}`` (the attention output of block i).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

KINDS = {"residuals": "resid", "resid": "resid", "mlp": "mlp", "attention": "attn", "attn": "attn"}
_SPEC = re.compile(r"^(?P<kind>[a-z]+)_(?P<a>all|\d+)(?:-(?P<b>\d*))?$")
_NAME = re.compile(r"^(?P<kind>resid|mlp|attn)(?P<layer>\d+)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str  # "resid" | "mlp" | "attn"

    @property
    def name(self) -> str:
        return f"{self.kind}{self.layer}"

    @classmethod
    def parse(cls, name: str) -> "Site":
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"not a site name: {name!r} (expected resid<i>, mlp<i> or attn<i>)")
        return cls(layer=int(m["layer"]), kind=m["kind"])


def expand_sites(specs: list[str], n_layers: int) -> list[Site]:
    """Expand shorthand (``all``, ``residuals_0-31``, ``residuals_10-``, ``mlp_all``, ``residuals_5``,
    or a plain site name ``resid5``) against the model's real layer count; out of range is an error."""
    sites: set[Site] = set()
    for spec in specs:
        spec_l = spec.strip().lower()
        if spec_l == "all":
            spec_l = "residuals_all"
        if m := _NAME.match(spec_l):
            kind, layers = m["kind"], [int(m["layer"])]
        elif m := _SPEC.match(spec_l):
            if m["kind"] not in KINDS:
                raise ValueError(
                    f"activation_layers: unknown site kind in {spec!r}; use residuals, mlp or attention"
                )
            kind = KINDS[m["kind"]]
            if m["a"] == "all":
                layers = list(range(n_layers))
            else:
                start = int(m["a"])
                if m["b"] is None:
                    layers = [start]
                else:
                    end = int(m["b"]) if m["b"] else n_layers - 1
                    if end < start:
                        raise ValueError(f"activation_layers: empty range in {spec!r}")
                    layers = list(range(start, end + 1))
        else:
            raise ValueError(
                f"activation_layers: cannot parse {spec!r} "
                "(e.g. 'all', 'residuals_0-31', 'residuals_10-', 'mlp_all', 'residuals_5')"
            )
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise ValueError(
                f"activation_layers: {spec!r} asks for layer {bad[0]} "
                f"but the model has {n_layers} layers (0-{n_layers - 1})"
            )
        sites.update(Site(layer, kind) for layer in layers)
    return sorted(sites)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a HF decoder-only model (Llama, Qwen2, Mistral, GPT-2...)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module whose forward output *is* the site's activation."""
    block = decoder_layers(model)[site.layer]
    if site.kind == "resid":
        return block
    if site.kind == "mlp":
        return block.mlp
    for name in ("self_attn", "attn", "attention"):
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"block {site.layer} of {type(model).__name__} has no attention module")


def output_tensor(output: object) -> torch.Tensor:
    """Hidden states from a module output (a tensor, or a tuple whose first item is one)."""
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def replace_output(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])  # type: ignore[index]
