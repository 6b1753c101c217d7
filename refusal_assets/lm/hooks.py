"""Forward hooks on the model, registered for one block of code and always removed.

Every intervention in the project (reading activations, patching them for gradients, splicing an
SAE in, ablating a direction, ending a forward pass early) is a forward hook on a site's module.
They go through :func:`forward_hooks`, so no exception, early stop or failed assertion can leave a
hook behind on a model that later code reuses (as sparsify's ``resolve_widths`` does it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

from torch import nn

from refusal_assets.lm.sites import Site, site_module

Hook = Callable[[nn.Module, tuple, object], object]


class StopForward(Exception):
    """Raised by the stop hook: the blocks after it and the LM head never run."""


def _stop(_module: nn.Module, _inputs: tuple, _output: object) -> None:
    raise StopForward


@contextlib.contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, Hook]], stop_after: nn.Module | None = None
) -> Iterator[None]:
    """Register ``(module, hook)`` pairs in order for the duration of the block; with ``stop_after``
    a last hook on that module ends the pass (catch it with :data:`until_stopped`). Registered last,
    so every other hook on that module has already run when it fires."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        if stop_after is not None:
            handles.append(stop_after.register_forward_hook(_stop))
        yield
    finally:
        for h in handles:
            h.remove()


def site_hooks(
    model: nn.Module, fns: Mapping[Site, Hook], stop_after: nn.Module | None = None
) -> contextlib.AbstractContextManager[None]:
    """:func:`forward_hooks` with hooks given per site (on each site's module)."""
    return forward_hooks([(site_module(model, s), fn) for s, fn in fns.items()], stop_after)


def until_stopped() -> contextlib.AbstractContextManager[None]:
    """Wrap the forward call: a pass ended by the stop hook returns normally."""
    return contextlib.suppress(StopForward)
