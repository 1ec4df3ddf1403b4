"""The backend-independent part of the scores op (docs/contract.md §3): given a backend's Gram
function, S, S' = rownorm(S * softmax(S)) and the active mask.

A backend's ``scores`` is ``scores(e, present, mode, gram)`` with its own ``gram(e, present,
per_sample)``: the Gram entries z_i . z_j of the normalised present rows (0 where absent),
[B, M, M] per sample, or their sum over samples [M, M].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .._normalize import accumulation_dtype

Gram = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def masked_softmax(scores: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Row softmax over the active entries; inactive entries get weight 0, empty rows are all 0."""
    masked = scores.masked_fill(~active, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max) * active
    denom = expd.sum(dim=-1, keepdim=True)
    return expd / torch.where(denom > 0, denom, torch.ones_like(denom))


def harmonize(scores: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """S' = rownorm(S * softmax(S)) with the softmax restricted to active entries (docs/contract.md §3)."""
    return F.normalize(scores * masked_softmax(scores, active), dim=-1, eps=1e-12)


def gram_as_given(e: torch.Tensor, present: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """The Gram entries x_i . x_j of the present rows as given (normalize=False; 0 where absent)."""
    kept = torch.where(present[..., None], e, torch.zeros((), dtype=e.dtype, device=e.device))
    kept = kept.to(accumulation_dtype(e.dtype))
    return torch.einsum("mbd,nbd->bmn" if per_sample else "mbd,nbd->mn", kept, kept)


def scores(e: torch.Tensor, present: torch.Tensor, mode: str, gram: Gram):
    """(S, S_prime, active) from raw embeddings e [M, B, D] (backend contract in scale_fast/_dispatch.py)."""
    acc = accumulation_dtype(e.dtype)
    pf = present.to(acc)
    counts = pf @ pf.T  # |P_ij|
    active = counts >= 1
    if mode == "sample":
        g = gram(e, present, True)
        act = present.T[:, :, None] & present.T[:, None, :]
    else:
        # absent entries are exactly zero, so the sum over all b is the sum over P_ij
        g = gram(e, present, False) / counts.clamp(min=1)
        act = active
    S = torch.where(act, g, torch.zeros_like(g))
    return S, harmonize(S, act), active
