"""Exact top-k neighbours by brute force, in chunks of queries (memory: CHUNK x memory-size scores at a time)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 4096


def scores(queries: torch.Tensor, memory: torch.Tensor, metric: str) -> torch.Tensor:
    """[q, m]: cosine similarity, or minus the squared L2 distance (larger is nearer either way)."""
    if metric == "cosine":
        return F.normalize(queries, dim=1) @ F.normalize(memory, dim=1).T
    if metric == "l2":
        d = (queries * queries).sum(1, keepdim=True) - 2 * queries @ memory.T + (memory * memory).sum(1)
        return -d.clamp_min(0)
    raise ValueError(f"metric={metric!r}: 'cosine' or 'l2'")


def exact_topk(queries: torch.Tensor, memory: torch.Tensor, k: int, metric: str = "cosine",
               exclude: torch.Tensor | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` nearest rows of `memory` [m, D] for each query [q, D]: (indices long [q, k], scores [q, k]), best
    first. `exclude` (long [q], or -1): a memory row each query may not return (itself, when queries are memory
    rows)."""
    if not 0 < k <= memory.shape[0] - (0 if exclude is None else 1):
        raise ValueError(f"k={k} neighbours from a memory of {memory.shape[0]} rows")
    indices, values = [], []
    for start in range(0, queries.shape[0], chunk):
        s = scores(queries[start:start + chunk], memory, metric)
        if exclude is not None:
            own = exclude[start:start + chunk].to(s.device)
            rows = (own >= 0).nonzero().flatten()
            s[rows, own[rows]] = float("-inf")
        v, i = s.topk(k, dim=1)
        indices.append(i)
        values.append(v)
    return torch.cat(indices), torch.cat(values)
