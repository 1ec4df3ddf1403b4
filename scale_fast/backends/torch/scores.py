"""Inter-modality scores S and self-harmonizing weights S' (docs/contract.md §3), in plain torch.

The Gram entries z_i . z_j are formed by a Function that normalises a chunk of
samples at a time and recomputes it in backward, so no normalised [M, B, D]
copy is kept; the rest (scale_fast/backends/_scores.py) works on [B, M, M] and is
left to autograd.
"""
from __future__ import annotations

import torch

from ..._normalize import accumulation_dtype, normalize_rows, normalize_rows_backward
from .._scores import gram_as_given, scores as shared_scores

# Forward and backward hold about four [M, chunk, D] temporaries (backward next to two
# [M, B, D] gradients: its own and the contrastive loss's, which autograd adds up): small
# chunks keep that peak low, and keep them below the sizes the C allocator would keep
# resident after they are freed.  Every sample is computed alone, so the chunk size does
# not change a value.
SAMPLES_PER_CHUNK = 1024


def _chunks(n: int, size: int = SAMPLES_PER_CHUNK):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _normalized_chunk(e, present, cols, acc):
    """(z, inv, projected) of samples `cols`: unit rows where present, 0 (and inv 0) elsewhere."""
    keep = present[:, cols]
    kept = torch.where(keep[..., None], e[:, cols], torch.zeros((), dtype=e.dtype, device=e.device)).to(acc)
    z, inv, projected = normalize_rows(kept)
    return z, inv * keep, projected


class _Gram(torch.autograd.Function):
    """Per-sample Gram matrices [B, M, M] (per_sample) or their sum over samples [M, M]."""

    @staticmethod
    def forward(ctx, e, present, per_sample: bool):
        acc = accumulation_dtype(e.dtype)
        M, B, _ = e.shape
        out = torch.zeros((B, M, M) if per_sample else (M, M), dtype=acc, device=e.device)
        for cols in _chunks(B):
            z, _, _ = _normalized_chunk(e, present, cols, acc)
            if per_sample:
                out[cols] = torch.einsum("mbd,nbd->bmn", z, z)
            else:
                out += torch.einsum("mbd,nbd->mn", z, z)
        ctx.save_for_backward(e, present)
        ctx.per_sample = per_sample
        return out

    @staticmethod
    def backward(ctx, grad):
        e, present = ctx.saved_tensors
        acc = accumulation_dtype(e.dtype)
        sym = (grad + grad.transpose(-1, -2)).to(acc)
        de = torch.empty(e.shape, dtype=e.dtype, device=e.device)
        for cols in _chunks(e.shape[1]):
            z, inv, projected = _normalized_chunk(e, present, cols, acc)
            if ctx.per_sample:
                dz = torch.einsum("bmn,nbd->mbd", sym[cols], z)
            else:
                dz = torch.einsum("mn,nbd->mbd", sym, z)
            de[:, cols] = normalize_rows_backward(z, dz, inv, projected)
        return de, None, None


def scores(e: torch.Tensor, present: torch.Tensor, mode: str, *, normalize: bool = True):
    """(S, S_prime, active) from raw embeddings e [M, B, D] (backend contract in _dispatch.py);
    normalize=False: the rows as given (the shared Gram)."""
    return shared_scores(e, present, mode, _Gram.apply if normalize else gram_as_given)
