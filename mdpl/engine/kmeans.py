"""Exact k-means in torch, batched over independent problems (one per layer), on any device.

Lloyd's algorithm (every point against every centre, chunked over points: no approximation, no mini-batches) from
k-means++ seeds, as ``sklearn.cluster.KMeans(init="k-means++", algorithm="lloyd")`` defines it, with two documented
differences: the seeding draws one candidate per step (sklearn's greedy variant draws 2 + log k and keeps the best),
and the random numbers come from a ``torch.Generator`` on the CPU, so a seed gives the same centres on every device
up to floating-point rounding.

Seeding protocol (what a reference implementation must replay): per restart, ``u = torch.rand(k, B, generator=g,
dtype=float64)``; the first centre of problem b is point ``floor(u[0, b] * n)``, centre j > 0 the first point whose
cumulative squared distance to its nearest chosen centre exceeds ``u[j, b]`` times the total.
Convergence: stop when the summed squared centre shift is at most ``tol`` times the mean per-dimension variance of
the points (sklearn's rule), per problem; a converged problem keeps its centres. An empty cluster takes the point
farthest from its centre (sklearn relocates empty clusters to far points too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 8192
"""Points per distance block (memory: B x CHUNK x k floats)."""


@dataclass
class KMeansResult:
    """Centres [B, k, D], labels long [B, n], inertia [B] (sum of squared distances), iterations run [B]."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    iterations: torch.Tensor


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||x_i - c_j||^2 [B, n, k] for x [B, n, D], centres [B, k, D] (expanded form, clamped at 0)."""
    d = torch.baddbmm((centres * centres).sum(-1).unsqueeze(1), x, centres.transpose(1, 2), alpha=-2.0)
    return (d + (x * x).sum(-1, keepdim=True)).clamp_min_(0)


def assign(x: torch.Tensor, centres: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point (labels long [B, n]) and its squared distance [B, n], in chunks of points."""
    labels, dists = [], []
    for start in range(0, x.shape[1], chunk):
        d, i = squared_distances(x[:, start:start + chunk], centres).min(dim=2)
        labels.append(i)
        dists.append(d)
    return torch.cat(labels, 1), torch.cat(dists, 1)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds [B, k, D] of x [B, n, D] (the seeding protocol of the module docstring)."""
    b, n, _ = x.shape
    u = torch.rand(k, b, generator=generator, dtype=torch.float64).to(x.device)
    rows = torch.arange(b, device=x.device)
    first = (u[0] * n).long().clamp_(max=n - 1)
    centres = [x[rows, first]]
    nearest = squared_distances(x, centres[0].unsqueeze(1)).squeeze(2).double()
    for j in range(1, k):
        cumulative = nearest.cumsum(1)
        target = (u[j] * cumulative[:, -1]).unsqueeze(1)
        pick = torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(max=n - 1)
        centres.append(x[rows, pick])
        new = squared_distances(x, centres[-1].unsqueeze(1)).squeeze(2).double()
        nearest = torch.minimum(nearest, new)
    return torch.stack(centres, 1)


def update(x: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """New centres: the mean of each cluster's points; an empty cluster takes the point farthest from its centre
    (the farthest first, each point once)."""
    b, _, dim = x.shape
    k = centres.shape[1]
    sums = x.new_zeros(b, k, dim).scatter_add_(1, labels.unsqueeze(2).expand(-1, -1, dim), x)
    counts = x.new_zeros(b, k).scatter_add_(1, labels, torch.ones_like(dists))
    new = sums / counts.clamp_min(1).unsqueeze(2)
    empty = counts == 0
    if bool(empty.any()):
        order = dists.argsort(dim=1, descending=True, stable=True)
        for row in empty.any(dim=1).nonzero().flatten().tolist():
            slots = empty[row].nonzero().flatten()
            new[row, slots] = x[row, order[row, :len(slots)]]
    return new


def lloyd(x: torch.Tensor, centres: torch.Tensor, iters: int, tol: float) -> KMeansResult:
    """Lloyd iterations from `centres` [B, k, D] until convergence (per problem) or `iters`."""
    threshold = tol * x.var(dim=1, unbiased=False).mean(dim=1)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    iterations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iters):
        labels, dists = assign(x, centres)
        new = update(x, labels, dists, centres)
        shift = ((new - centres) ** 2).sum(dim=(1, 2))
        centres = torch.where(active[:, None, None], new, centres)
        iterations += active.long()
        active &= shift > threshold
        if not bool(active.any()):
            break
    labels, dists = assign(x, centres)
    return KMeansResult(centres, labels, dists.sum(1), iterations)


def kmeans(x: torch.Tensor, k: int, iters: int = 300, seed: int = 0, n_init: int = 1,
           tol: float = 1e-4) -> KMeansResult:
    """K-means of B independent problems x [B, n, D] (float32 or float64) with k <= n clusters each; of `n_init`
    seeded restarts the one with the lowest inertia is kept, per problem."""
    if x.dim() != 3 or not 0 < k <= x.shape[1]:
        raise ValueError(f"kmeans needs x [B, n, D] with 0 < k <= n, got {tuple(x.shape)} and k={k}")
    generator = torch.Generator().manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(max(1, int(n_init))):
        result = lloyd(x, kmeans_plus_plus(x, k, generator), iters, tol)
        if best is None:
            best = result
            continue
        better = result.inertia < best.inertia
        best = KMeansResult(*(torch.where(better.view(-1, *[1] * (new.dim() - 1)), new, old)
                              for new, old in zip(vars(result).values(), vars(best).values())))
    return best
