"""Inter-modality scores S and S' (docs/contract.md §3) with the per-sample Gram in C++.

The Gram entries z_i . z_j of every sample are formed in one pass over the raw embeddings
(rows normalised on the fly, absent rows never read) and recomputed the same way in
backward: nothing of size [M, B, D] is kept or materialised besides the gradient.  The
rest works on [B, M, M] (softmax, harmonisation: scale_fast/backends/_scores.py).
"""
from __future__ import annotations

import torch

from ..._normalize import accumulation_dtype
from .._scores import gram_as_given, scores as shared_scores
from ._build import loaded as _ext


class _SampleGram(torch.autograd.Function):
    """[B, M, M] Gram matrices of the normalised present rows of e [M, B, D] (0 where absent)."""

    @staticmethod
    def forward(ctx, e, present):
        acc = accumulation_dtype(e.dtype)
        ec = e.to(acc).contiguous()
        pc = present.contiguous()
        G, inv = _ext().sample_gram_forward(ec, pc)
        ctx.save_for_backward(e, pc, inv)
        return G

    @staticmethod
    def backward(ctx, grad):
        e, present, inv = ctx.saved_tensors
        acc = inv.dtype
        de = _ext().sample_gram_backward(e.to(acc).contiguous(), present, inv, grad.to(acc).contiguous())
        return de.to(e.dtype), None


def _gram(e: torch.Tensor, present: torch.Tensor, per_sample: bool) -> torch.Tensor:
    g = _SampleGram.apply(e, present)
    return g if per_sample else g.sum(0)


def scores(e: torch.Tensor, present: torch.Tensor, mode: str, *, normalize: bool = True):
    """(S, S_prime, active) from raw embeddings e [M, B, D] (backend contract in _dispatch.py).

    normalize=False: the rows as given (the shared Gram; the C++ one normalises on the fly).
    """
    return shared_scores(e, present, mode, _gram if normalize else gram_as_given)
