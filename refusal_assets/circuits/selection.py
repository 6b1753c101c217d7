"""Circuit selection: which nodes form a circuit, given mean node effects, and the flat node index
(each site's SAE latents, then its error node) the masks are laid out in."""

from __future__ import annotations

from typing import Literal

import numpy as np

from refusal_assets.lm.sites import Site

Mode = Literal["topk", "threshold", "topk_abs", "threshold_abs"]


def select_circuits(
    means: np.ndarray, site_of_node: np.ndarray, mode: Mode, k_per_site: int, threshold: float
) -> np.ndarray:
    """Circuit masks ``[batch, n_nodes]`` for mean effects ``[batch, n_nodes]``: :func:`select_circuit`
    over a batch of resampled means at once (the comparison's permutations and bootstraps)."""
    if mode not in ("topk", "threshold", "topk_abs", "threshold_abs"):
        raise ValueError(
            f"mode must be 'topk', 'threshold', 'topk_abs' or 'threshold_abs', not {mode!r}"
        )
    if mode.endswith(
        "_abs"
    ):  # rank by magnitude: refusal-suppressing nodes count too (Marks et al. keep both signs)
        means, mode = np.abs(means), mode.removesuffix("_abs")
    if mode == "threshold":
        return means >= threshold
    mask = np.zeros(means.shape, dtype=bool)
    if k_per_site == 0:
        return mask
    for site in np.unique(site_of_node):
        nodes = np.flatnonzero(site_of_node == site)  # ascending node index
        x = means[:, nodes]  # [batch, n_site]
        if k_per_site >= nodes.size:
            mask[:, nodes] = True
            continue
        # O(n) partition instead of a full sort (sites can hold ~10^4-10^5 latents): keep everything
        # above the k-th largest value, then fill the remaining slots from its ties, lowest index first.
        kth = -np.partition(-x, k_per_site - 1, axis=1)[
            :, k_per_site - 1 : k_per_site
        ]  # [batch, 1]
        above = x > kth
        ties = x == kth
        n_fill = k_per_site - above.sum(axis=1, keepdims=True)  # [batch, 1], >= 1
        mask[:, nodes] = above | (ties & (np.cumsum(ties, axis=1) <= n_fill))
    return mask


def select_circuit(
    mean_effect: np.ndarray,
    site_of_node: np.ndarray,
    mode: Mode = "topk",
    k_per_site: int = 20,
    threshold: float = 0.0,
) -> np.ndarray:
    """Circuit mask ``[n_nodes]`` (bool) from a mean effect vector ``[n_nodes]``.

    ``topk``: at every site the ``k_per_site`` nodes with the largest SIGNED mean effect (those that
    push hardest towards refusal; ties go to the lower node index); a site with fewer nodes keeps all.
    ``threshold``: every node with mean effect ``>= threshold``.
    ``topk_abs`` / ``threshold_abs``: the same on ``|mean effect|``, so nodes that push away from
    refusal are kept too; the circuit then tends to faithfulness 1 instead of overshooting it.
    """
    mean_effect = np.asarray(mean_effect, dtype=float)
    site_of_node = np.asarray(site_of_node)
    if mean_effect.ndim != 1 or mean_effect.shape != site_of_node.shape:
        raise ValueError(
            f"mean_effect {mean_effect.shape} and site_of_node {site_of_node.shape} must be equal 1-D"
        )
    if k_per_site < 0:
        raise ValueError(f"k_per_site must be >= 0, not {k_per_site}")
    if not np.isfinite(mean_effect).all():
        raise ValueError("mean_effect holds non-finite values; a NaN node has no rank")
    return select_circuits(mean_effect[None], site_of_node, mode, k_per_site, threshold)[0]


class NodeIndex:
    """Flat node index over sites: each site's latents, then its error node."""

    def __init__(self, sites: list[Site], d_saes: list[int]):
        self.sites = sites
        self.d_saes = d_saes
        self.offsets = np.cumsum([0] + [d + 1 for d in d_saes])  # [S+1]
        self.n_nodes = int(self.offsets[-1])
        self.site_of_node = np.repeat(np.arange(len(sites)), [d + 1 for d in d_saes])  # [n_nodes]

    def site_slice(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def error_node(self, s: int) -> int:
        return int(self.offsets[s + 1] - 1)

    def describe(self, node: int) -> dict:
        s = int(self.site_of_node[node])
        local = node - int(self.offsets[s])
        return {
            "node": int(node),
            "site": self.sites[s].name,
            "latent": None if local == self.d_saes[s] else int(local),
            "is_error": local == self.d_saes[s],
        }
