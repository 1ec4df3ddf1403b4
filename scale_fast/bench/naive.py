"""Naive, materialized PyTorch baselines of the benchmarked ops (docs/contract.md §3-§5).

What a user would write: every pair's whole logits matrix built, the diagonal masked,
``F.cross_entropy`` applied (form "siglip": ``F.logsigmoid`` of the labelled logits, as
OpenCLIP's SigLipLoss); S' in plain torch (gradients flow through it).  They compute in
the dtype of their inputs (the loss of low-precision logits in float32, as the CE peers
do) and are deliberately memory-hungry.  ``contrastive_chunked`` and ``linear_ce_chunked``
compute the same losses with bounded memory (row chunks recomputed in backward through
checkpointing): the references where the materialized ones do not fit; they are never timed.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_SCALE = 1 / 0.07
_FILL = -1.0e4   # finite "minus infinity" of the masked softmax (|S| <= 1)


def _float(logits):
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _ce(logits, target, reduction="mean"):
    return F.cross_entropy(_float(logits), target, reduction=reduction)


def _sigmoid_sum(logits, r0: int = 0):
    """-Σ log σ(y · logits) of a row block whose rows are r0, r0+1, ...: y = +1 on the
    positives (column r0 + row), -1 elsewhere; the [rows, n] labels materialized."""
    logits = _float(logits)
    labels = -torch.ones_like(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    labels[rows, rows + r0] = 1.0
    return -F.logsigmoid(labels * logits).sum()


def normalize(e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """z = e / max(||e||, 1e-12) for present rows, exactly 0 for absent rows."""
    z = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(present[..., None], z, torch.zeros_like(z))


def scores_sample(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-sample S' [B, M, M] (mode="sample")."""
    zb = z.transpose(0, 1)
    S = zb @ zb.transpose(1, 2)
    pb = present.transpose(0, 1)
    act = pb[:, :, None] & pb[:, None, :]
    S = torch.where(act, S, torch.zeros_like(S))
    A = torch.softmax(torch.where(act, S, torch.full_like(S, _FILL)), dim=-1)
    R = S * torch.where(act, A, torch.zeros_like(A))
    return R / R.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pair_sizes(present: torch.Tensor) -> list:
    """n of every pair i < j (samples holding both modalities)."""
    p = present.cpu()
    return [int((p[i] & p[j]).sum()) for i, j in itertools.combinations(range(p.shape[0]), 2)]


def _mean(losses, e):
    """Mean over the active pairs (0, connected to e, when there is none)."""
    return sum(losses) / len(losses) if losses else (e * 0.0).sum()


def _pairs(z, present, weights):
    """(z_i[V], z_j[V], w [n] or None) of every active pair."""
    for i, j in itertools.combinations(range(z.shape[0]), 2):
        V = torch.nonzero(present[i] & present[j]).flatten()
        if V.numel():
            yield z[i, V], z[j, V], None if weights is None else weights[V, i, j]


def contrastive(e, present, *, form: str, weights=None, logit_scale=LOGIT_SCALE, logit_bias=0.0):
    """Mean over active pairs of the pair losses, every pair's logits materialized."""
    losses = []
    for a, b, w in _pairs(normalize(e, present), present, weights):
        n = a.shape[0]
        if form == "siglip":
            scale = logit_scale if w is None else logit_scale * w[:, None]
            loss = _sigmoid_sum((a @ b.t()) * scale + logit_bias) / n
        elif form == "ntxent":
            u = torch.cat([a, b])
            scale = logit_scale if w is None else logit_scale * torch.cat([w, w])[:, None]
            logits = ((u @ u.t()) * scale).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device),
                                                       float("-inf"))
            r = torch.arange(2 * n, device=u.device)
            loss = _ce(logits, (r + n) % (2 * n))
        else:
            scale = logit_scale if w is None else logit_scale * w[:, None]
            t = torch.arange(n, device=a.device)
            loss = 0.5 * (_ce((a @ b.t()) * scale, t) + _ce((b @ a.t()) * scale, t))
        losses.append(loss)
    return _mean(losses, e)


def _ntxent_rows(u, wr, r0: int, n: int, logit_scale: float, chunk):
    r = torch.arange(r0, r0 + chunk.shape[0], device=u.device)
    logits = (chunk @ u.t()) * (logit_scale * wr[r])[:, None]
    logits[torch.arange(r.numel(), device=u.device), r] = float("-inf")
    return _ce(logits, (r + n) % (2 * n), "sum")


def _clip_rows(b, w, r0: int, logit_scale: float, chunk):
    r = torch.arange(r0, r0 + chunk.shape[0], device=b.device)
    return _ce((chunk @ b.t()) * (logit_scale * w[r])[:, None], r, "sum")


def _siglip_rows(b, w, r0: int, logit_scale: float, logit_bias: float, chunk):
    r = torch.arange(r0, r0 + chunk.shape[0], device=b.device)
    return _sigmoid_sum((chunk @ b.t()) * (logit_scale * w[r])[:, None] + logit_bias, r0)


def contrastive_chunked(e, present, *, form: str, harmonize: bool, logit_scale=LOGIT_SCALE, logit_bias=0.0,
                        chunk_rows=2048):
    """contrastive(e, present, form, weights=S' or None) in row chunks: memory O(chunk x 2n)."""
    z = normalize(e, present)
    weights = scores_sample(z, present) if harmonize else None
    losses = []
    for a, b, w in _pairs(z, present, weights):
        n = a.shape[0]
        w = torch.ones(n, dtype=z.dtype, device=z.device) if w is None else w
        if form == "siglip":
            loss = sum(checkpoint(_siglip_rows, b, w, r0, logit_scale, logit_bias, a[r0:r0 + chunk_rows],
                                  use_reentrant=False) for r0 in range(0, n, chunk_rows)) / n
        elif form == "ntxent":
            u, wr = torch.cat([a, b]), torch.cat([w, w])
            loss = sum(checkpoint(_ntxent_rows, u, wr, r0, n, logit_scale, u[r0:r0 + chunk_rows],
                                  use_reentrant=False) for r0 in range(0, 2 * n, chunk_rows)) / (2 * n)
        else:
            loss = 0.5 * sum(checkpoint(_clip_rows, y, w, r0, logit_scale, x[r0:r0 + chunk_rows], use_reentrant=False)
                             for x, y in ((a, b), (b, a)) for r0 in range(0, n, chunk_rows)) / n
        losses.append(loss)
    return _mean(losses, e)


def contrastive_bytes(present: torch.Tensor, elem_bytes: int, form: str) -> int:
    """Rough peak extra memory of the naive fwd+bwd: per pair the graph keeps about 2.25
    (ntxent), 4 (clip: two matrices) or 4.5 (siglip: labels, labelled logits, logsigmoid's
    buffer, the unweighted logits under S' weights) logits-sized buffers; backward needs ~3
    (siglip ~2) more transiently for the largest pair."""
    sq = [(2 * n) ** 2 if form == "ntxent" else n * n for n in pair_sizes(present)]
    kept, transient = {"ntxent": (2.25, 3.0), "clip": (4.0, 3.0), "siglip": (4.5, 2.0)}[form]
    return int(elem_bytes * (kept * sum(sq) + transient * max(sq))) if sq else 0


def linear_ce(hidden, weight, target, row_scale=None):
    """F.linear + F.cross_entropy: the whole [N, K] logits materialized."""
    logits = F.linear(hidden, weight)
    if row_scale is not None:
        logits = logits * row_scale[:, None]
    return _ce(logits, target)


def _ce_rows_sum(weight, target, hidden):
    return F.cross_entropy(_float(F.linear(hidden, weight)), target, reduction="sum")


def linear_ce_chunked(hidden, weight, target, chunk_bytes: int = 256 * 2 ** 20):
    """linear_ce(hidden, weight, target) in row chunks whose logits stay under chunk_bytes (recomputed
    in backward through checkpointing): the reference at any N x K; never timed."""
    n, k = hidden.shape[0], weight.shape[0]
    rows = max(1, min(n, chunk_bytes // max(1, k * hidden.element_size())))
    return sum(checkpoint(_ce_rows_sum, weight, target[r0:r0 + rows], hidden[r0:r0 + rows], use_reentrant=False)
               for r0 in range(0, n, rows)) / n


def linear_ce_bytes(N: int, K: int, elem_bytes: int) -> int:
    """logits + log-softmax output + logits grad (+ the float32 copies for low precision)."""
    return (3 + (2 if elem_bytes < 4 else 0)) * N * K * elem_bytes
