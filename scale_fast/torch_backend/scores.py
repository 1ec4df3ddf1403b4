"""Inter-modality scores S and self-harmonizing weights S' (SPEC section 3), in plain torch.

The work is O(B * M^2 * D) with O(B * M^2) memory, so autograd through ordinary
ops is already frugal; no custom Function is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Row softmax over the active entries; inactive entries get weight 0, empty rows are all 0."""
    masked = scores.masked_fill(~active, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max) * active
    denom = expd.sum(dim=-1, keepdim=True)
    return expd / torch.where(denom > 0, denom, torch.ones_like(denom))


def harmonize(scores: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """S' = rownorm(S * softmax(S)) with the softmax restricted to active entries."""
    return F.normalize(scores * masked_softmax(scores, active), dim=-1, eps=1e-12)


def scores(z: torch.Tensor, present: torch.Tensor, mode: str):
    """(S, S_prime, active) from normalised embeddings z [M, B, D] (absent rows zero)."""
    acc = accumulation_dtype(z.dtype)
    zf = z.to(acc)
    pf = present.to(acc)
    counts = pf @ pf.T  # |P_ij|
    active = counts >= 1
    if mode == "sample":
        per_sample = zf.transpose(0, 1)  # [B, M, D]
        gram = per_sample @ per_sample.transpose(1, 2)  # [B, M, M]
        act = present.T[:, :, None] & present.T[:, None, :]
    else:
        # absent rows are exactly zero, so the sum over all b is the sum over P_ij
        gram = torch.einsum("ibd,jbd->ij", zf, zf) / counts.clamp(min=1)
        act = active
    S = torch.where(act, gram, torch.zeros_like(gram))
    return S, harmonize(S, act), active
