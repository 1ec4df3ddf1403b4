"""Naive, materialized PyTorch implementations of the benchmarked ops (docs/contract.md §3-§5).

These are the "what a user would write" baselines: every pair's full logits matrix
is built, the diagonal masked, and ``F.cross_entropy`` applied.  They follow
docs/contract.md exactly (present masks, S' weights multiplying the logits, ntxent / clip
forms), compute in the dtype of their inputs, and are deliberately memory-hungry.

A second, row-chunked variant (``contrastive_chunked``) computes the same loss
with bounded memory (each chunk of rows is recomputed in backward through
``torch.utils.checkpoint``).  The benchmarks use it as the independent float32
reference where the materialized one would not fit in memory; it is never timed
against the library.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_FILL = -1.0e4  # finite "minus infinity" for masked softmax entries (|S| <= 1)


# --------------------------------------------------------------------------- scores
def normalize(embeddings: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """z = e / max(||e||, 1e-12) for present rows, exactly 0 for absent rows."""
    z = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(present[..., None], z, torch.zeros_like(z))


def scores_sample(z: torch.Tensor, present: torch.Tensor):
    """Per-sample S, S' [B, M, M] (docs/contract.md §3, mode="sample"), plain torch."""
    zb = z.transpose(0, 1)                                  # [B, M, D]
    S = zb @ zb.transpose(1, 2)                             # [B, M, M]
    pb = present.transpose(0, 1)                            # [B, M]
    act = pb[:, :, None] & pb[:, None, :]
    S = torch.where(act, S, torch.zeros_like(S))
    A = torch.softmax(torch.where(act, S, torch.full_like(S, _FILL)), dim=-1)
    A = torch.where(act, A, torch.zeros_like(A))
    R = S * A
    Sp = R / R.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return S, Sp


# --------------------------------------------------------------------- contrastive
def _pair_indices(present: torch.Tensor, i: int, j: int) -> torch.Tensor:
    return torch.nonzero(present[i] & present[j]).flatten()


def pair_loss_ntxent(z, i, j, V, logit_scale, w):
    """NT-Xent of pair (i, j) over samples V with per-sample weights w [n] (or None)."""
    n = V.numel()
    u = torch.cat([z[i, V], z[j, V]], dim=0)               # [2n, D]
    logits = u @ u.t()                                      # [2n, 2n]
    scale = logit_scale if w is None else logit_scale * torch.cat([w, w])[:, None]
    logits = logits * scale
    eye = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(eye, float("-inf"))
    r = torch.arange(2 * n, device=u.device)
    target = (r + n) % (2 * n)
    return F.cross_entropy(logits, target)


def pair_loss_clip(z, i, j, V, logit_scale, w):
    """Symmetric cross-modal InfoNCE of pair (i, j) (docs/contract.md §4, form="clip")."""
    n = V.numel()
    zi, zj = z[i, V], z[j, V]
    scale = logit_scale if w is None else logit_scale * w[:, None]
    l_ij = (zi @ zj.t()) * scale
    l_ji = (zj @ zi.t()) * scale
    t = torch.arange(n, device=zi.device)
    return 0.5 * (F.cross_entropy(l_ij, t) + F.cross_entropy(l_ji, t))


def multi_pair_info_nce(embeddings, present=None, *, logit_scale=1 / 0.07, weights=None, form="ntxent"):
    """[M, M] pair losses (upper triangle), naive and materialized.

    weights: None, [M, M] or [B, M, M] (docs/contract.md §7)."""
    M, B, _ = embeddings.shape
    if present is None:
        present = torch.ones(M, B, dtype=torch.bool, device=embeddings.device)
    z = normalize(embeddings, present)
    out = torch.zeros(M, M, dtype=torch.float64 if embeddings.dtype == torch.float64 else torch.float32,
                      device=embeddings.device)
    pair_fn = pair_loss_ntxent if form == "ntxent" else pair_loss_clip
    losses = {}
    for i, j in itertools.combinations(range(M), 2):
        V = _pair_indices(present, i, j)
        if V.numel() == 0:
            continue
        if weights is None:
            w = None
        elif weights.dim() == 2:
            w = weights[i, j].expand(V.numel())
        else:
            w = weights[V, i, j]
        losses[(i, j)] = pair_fn(z, i, j, V, logit_scale, w).to(out.dtype)
    if losses:
        idx = torch.tensor(list(losses.keys()), device=out.device)
        out = out.index_put((idx[:, 0], idx[:, 1]), torch.stack(list(losses.values())))
    return out


def scale_contrastive(embeddings, present=None, *, logit_scale=1 / 0.07, form="ntxent", harmonize=True):
    """The contrastive part of ``sf.scale_loss`` (sample mode, no tasks): mean over active
    pairs of L(i, j), with S' weights computed in plain torch (gradients flow through them)."""
    M, B, _ = embeddings.shape
    if present is None:
        present = torch.ones(M, B, dtype=torch.bool, device=embeddings.device)
    weights = None
    if harmonize:
        z = normalize(embeddings, present)
        _, weights = scores_sample(z, present)
    pair = multi_pair_info_nce(embeddings, present, logit_scale=logit_scale, weights=weights, form=form)
    active = torch.tensor([[bool((present[i] & present[j]).any()) and i < j for j in range(M)] for i in range(M)])
    n_active = int(active.sum())
    return pair.sum() / max(n_active, 1)


# ------------------------------------------------------- chunked float32 reference
def _ntxent_chunk(u, wr, rows0: int, n: int, logit_scale: float, chunk: torch.Tensor):
    """Sum over rows [rows0, rows0 + len) of the NT-Xent row losses (u: [2n, D])."""
    r = torch.arange(rows0, rows0 + chunk.shape[0], device=u.device)
    logits = (chunk @ u.t()) * (logit_scale * wr[r])[:, None]
    logits[torch.arange(r.numel(), device=u.device), r] = float("-inf")
    target = (r + n) % (2 * n)
    return F.cross_entropy(logits, target, reduction="sum")


def _clip_chunk(a, b, wa, rows0: int, logit_scale: float, chunk: torch.Tensor):
    r = torch.arange(rows0, rows0 + chunk.shape[0], device=a.device)
    logits = (chunk @ b.t()) * (logit_scale * wa[r])[:, None]
    return F.cross_entropy(logits, r, reduction="sum")


def contrastive_chunked(embeddings, present=None, *, logit_scale=1 / 0.07, form="ntxent",
                        harmonize=True, weights="scale", chunk_rows: int = 2048, reduce="mean"):
    """Same value (and, through checkpointing, the same gradients) as
    :func:`scale_contrastive` (weights="scale") or :func:`multi_pair_info_nce`
    (weights=None; then the mean over active pairs is returned when reduce="mean",
    the pair (0, 1) loss when reduce="pair01"), in row chunks: memory O(chunk x 2n)."""
    M, B, _ = embeddings.shape
    if present is None:
        present = torch.ones(M, B, dtype=torch.bool, device=embeddings.device)
    z = normalize(embeddings, present)
    Sp = None
    if weights == "scale" and harmonize:
        _, Sp = scores_sample(z, present)
    total, count = None, 0
    for i, j in itertools.combinations(range(M), 2):
        V = _pair_indices(present, i, j)
        n = V.numel()
        if n == 0:
            continue
        w = Sp[V, i, j] if Sp is not None else torch.ones(n, dtype=z.dtype, device=z.device)
        if form == "ntxent":
            u = torch.cat([z[i, V], z[j, V]], dim=0)
            wr = torch.cat([w, w])
            acc = None
            for r0 in range(0, 2 * n, chunk_rows):
                part = checkpoint(_ntxent_chunk, u, wr, r0, n, logit_scale, u[r0:r0 + chunk_rows],
                                  use_reentrant=False)
                acc = part if acc is None else acc + part
            loss = acc / (2 * n)
        else:
            zi, zj = z[i, V], z[j, V]
            halves = []
            for a, b in ((zi, zj), (zj, zi)):
                acc = None
                for r0 in range(0, n, chunk_rows):
                    part = checkpoint(_clip_chunk, a, b, w, r0, logit_scale, a[r0:r0 + chunk_rows],
                                      use_reentrant=False)
                    acc = part if acc is None else acc + part
                halves.append(acc / n)
            loss = 0.5 * (halves[0] + halves[1])
        if reduce == "pair01" and (i, j) == (0, 1):
            return loss
        total = loss if total is None else total + loss
        count += 1
    if total is None:
        return embeddings.sum() * 0.0
    return total / count


# ------------------------------------------------------------ memory estimates
def pair_sizes(present: torch.Tensor) -> list[int]:
    M = present.shape[0]
    return [int((present[i] & present[j]).sum()) for i, j in itertools.combinations(range(M), 2)]


def naive_contrastive_bytes(present: torch.Tensor, elem_bytes: int, form: str = "ntxent") -> int:
    """Rough peak extra memory of the naive fwd+bwd: per pair the autograd graph keeps
    about 2.25 logits-sized buffers ([2n, 2n] matmul output and log-softmax output, plus a
    bool diagonal mask); backward transiently needs ~3 more for the largest pair."""
    ns = pair_sizes(present)
    if form == "ntxent":
        sq = [(2 * n) ** 2 for n in ns]
        kept, transient = 2.25, 3.0
    else:
        sq = [n * n for n in ns]
        kept, transient = 4.0, 3.0     # two logit matrices per pair
    if not sq:
        return 0
    return int(elem_bytes * (kept * sum(sq) + transient * max(sq)))


# ------------------------------------------------------------------ linear CE
def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean"):
    """Plain F.linear + F.cross_entropy (the full [N, K] logits are materialized)."""
    return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                           reduction=reduction)


def naive_linear_ce_bytes(N: int, K: int, elem_bytes: int) -> int:
    """logits + log-softmax output + logits grad (+ the fp32 CE internals for low precision)."""
    extra = 2 if elem_bytes < 4 else 0
    return (3 + extra) * N * K * elem_bytes


def useful_flops_contrastive(present: torch.Tensor, D: int, form: str = "ntxent") -> float:
    """Useful FLOPs of one fwd+bwd: per active pair one logits GEMM forward and two
    (for d_rows, d_cols) backward: ntxent 6 (2n)^2 D, clip 6 n^2 D (one shared n x n matrix)."""
    ns = pair_sizes(present)
    if form == "ntxent":
        return float(sum(6 * (2 * n) ** 2 * D for n in ns))
    return float(sum(6 * n * n * D for n in ns))


def gib(x: float) -> float:
    return x / 2 ** 30


__all__ = [
    "normalize", "scores_sample", "multi_pair_info_nce", "scale_contrastive", "contrastive_chunked",
    "naive_contrastive_bytes", "linear_cross_entropy", "naive_linear_ce_bytes",
    "useful_flops_contrastive", "pair_sizes", "gib", "math",
]
