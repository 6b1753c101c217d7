"""Directional ablation and activation addition as hooks, always removed (as
:mod:`refusal_assets.lm.hooks`).

Ablation (Arditi et al. 2024, ``get_all_direction_ablation_hooks``): with r_hat = r / |r|, every
decoder block's input (a forward pre-hook) and every block's attention and MLP outputs (forward
hooks) become x - (x . r_hat) r_hat, at every position of every pass: the shared prefix, the
prompt's own tokens and each generated token alike. Since a block's output is its input plus the
two hooked outputs, the residual stream then has no component along r_hat anywhere.
Activation addition: x + r at one block's input, every position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from refusal_assets.lm.sites import Site, decoder_layers, output_tensor, replace_output, site_module


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x [..., d] without its component along the unit vector [d]."""
    unit = unit.to(x.dtype)
    return x - (x @ unit)[..., None] * unit


def _edit_first_input(edit):
    """A forward pre-hook (with kwargs) that edits the block's hidden states, wherever they are
    passed."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return hook


def _edit_output(edit):
    def hook(_module: nn.Module, _inputs: tuple, output: object) -> object:
        return replace_output(output, edit(output_tensor(output)))

    return hook


@contextlib.contextmanager
def _registered(
    pre: list[tuple[nn.Module, object]], post: list[tuple[nn.Module, object]]
) -> Iterator[None]:
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def direction_ablation(
    model: nn.Module, direction: torch.Tensor
) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``direction`` [d] is projected out of every block input, attention output
    and MLP output of ``model``, at every position."""
    unit = _unit(direction).to(next(model.parameters()).device)

    def edit(x: torch.Tensor) -> torch.Tensor:
        return project_out(x, unit)

    blocks = decoder_layers(model)
    pre = [(block, _edit_first_input(edit)) for block in blocks]
    post = [
        (site_module(model, Site(i, kind)), _edit_output(edit))
        for i in range(len(blocks))
        for kind in ("attn", "mlp")
    ]
    return _registered(pre, post)


def activation_addition(
    model: nn.Module, vector: torch.Tensor, layer: int
) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``vector`` [d] is added to block ``layer``'s input at every position."""
    added = vector.to(next(model.parameters()).device)

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x + added.to(x.dtype)

    return _registered([(decoder_layers(model)[layer], _edit_first_input(edit))], [])


@contextlib.contextmanager
def no_intervention() -> Iterator[None]:
    yield


class RowInterventions:
    """Ablation and addition per row, for one batched generation over chunks that each carry one
    intervention (:class:`refusal_assets.lm.behaviour.RowState`): chunk k ablates
    ``ablate[k]`` (None: nothing) at every block input and attention and MLP output, and adds
    ``add[k]`` (None: nothing) to block ``add_layer``'s input, as :func:`direction_ablation` and
    :func:`activation_addition` do for a whole pass. A zero row is no intervention: projecting out
    a zero unit vector and adding zero change nothing."""

    def __init__(
        self,
        model: nn.Module,
        ablate: list[torch.Tensor | None],
        add: list[torch.Tensor | None],
        add_layer: int,
    ):
        if len(ablate) != len(add):
            raise ValueError(f"RowInterventions: {len(ablate)} ablations for {len(add)} additions")
        self.model, self.add_layer = model, add_layer
        p = next(model.parameters())
        d = model.config.hidden_size
        zero = torch.zeros(d, device=p.device)
        self._units = torch.stack(
            [zero if r is None else _unit(r).to(p.device) for r in ablate]
        )  # [chunks, d]
        self._added = torch.stack(
            [zero if v is None else v.float().to(p.device) for v in add]
        )  # [chunks, d]
        self.units, self.added = self._units[:1], self._added[:1]  # [rows, d] read by the hooks

    def prefill_chunk(self, k: int) -> None:
        self.units, self.added = self._units[k : k + 1], self._added[k : k + 1]

    def decode(self, chunk_sizes: list[int]) -> None:
        index = torch.repeat_interleave(
            torch.arange(len(chunk_sizes)), torch.tensor(chunk_sizes)
        ).to(self._units.device)  # [rows]: each row's chunk
        self.units, self.added = self._units[index], self._added[index]

    def keep(self, index: torch.Tensor) -> None:
        index = index.to(self.units.device)
        self.units, self.added = self.units[index], self.added[index]

    def _project_out(self, x: torch.Tensor) -> torch.Tensor:
        unit = self.units.to(x.dtype)[:, None, :]  # [rows, 1, d]
        return x - (x * unit).sum(-1, keepdim=True) * unit

    def _add(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.added.to(x.dtype)[:, None, :]

    def registered(self) -> contextlib.AbstractContextManager[None]:
        """The hooks, removed on exit."""
        blocks = decoder_layers(self.model)
        pre = [(block, _edit_first_input(self._project_out)) for block in blocks]
        pre.append((blocks[self.add_layer], _edit_first_input(self._add)))
        post = [
            (site_module(self.model, Site(i, kind)), _edit_output(self._project_out))
            for i in range(len(blocks))
            for kind in ("attn", "mlp")
        ]
        return _registered(pre, post)


def _unit(direction: torch.Tensor) -> torch.Tensor:
    norm = direction.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(
            f"direction ablation: the direction's norm is {float(norm)}; need a finite non-zero "
            "vector"
        )
    return direction.float() / norm
