"""Float64 plain-PyTorch reference of docs/contract.md §2–§6 (the ground truth of the tests).

Written from docs/contract.md alone, as plainly and materialized as possible: every
logit matrix is built whole, pairs and tasks are explicit Python loops, and
nothing here imports scale_fast.  Everything is differentiable with autograd
(call it on float64 leaves to get reference gradients).

Absent rows may hold NaN: they are replaced by a constant with ``torch.where``
*before* any arithmetic, so neither their values nor NaN gradients can leak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

EPS = 1e-12


# --------------------------------------------------------------------------- #
# §2 inputs
# --------------------------------------------------------------------------- #
def as_stack(embeddings) -> torch.Tensor:
    """[M, B, D] tensor from a tensor or a sequence of M [B, D] tensors."""
    if isinstance(embeddings, torch.Tensor):
        return embeddings
    return torch.stack(list(embeddings), 0)


def default_present(e: torch.Tensor, present) -> torch.Tensor:
    if present is None:
        return torch.ones(e.shape[0], e.shape[1], dtype=torch.bool, device=e.device)
    return present.to(torch.bool)


def ref_normalize(e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """z[m, b] = e[m, b] / max(||e[m, b]||, 1e-12); absent rows are exactly 0 (no grad)."""
    keep = present[..., None]
    e_safe = torch.where(keep, e, torch.ones((), dtype=e.dtype, device=e.device))
    norm = torch.sqrt((e_safe * e_safe).sum(-1, keepdim=True))
    z = e_safe / torch.clamp(norm, min=EPS)
    return torch.where(keep, z, torch.zeros((), dtype=e.dtype, device=e.device))


def ref_rows(e: torch.Tensor, present: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """ref_normalize, or (normalize=False) the present rows as given and absent rows exactly 0."""
    if normalize:
        return ref_normalize(e, present)
    return torch.where(present[..., None], e, torch.zeros((), dtype=e.dtype, device=e.device))


# --------------------------------------------------------------------------- #
# §3 scores
# --------------------------------------------------------------------------- #
def _masked_row_softmax(S: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of S over the entries where act; others exactly 0; empty rows all 0."""
    neg_inf = torch.full_like(S, -math.inf)
    row_max = torch.where(act, S, neg_inf).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    ex = torch.where(act, torch.exp(torch.where(act, S, torch.zeros_like(S)) - row_max), torch.zeros_like(S))
    den = ex.sum(-1, keepdim=True)
    den_safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(act, ex / den_safe, torch.zeros_like(S))


def _harmonize(S: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """S' = rownorm(S ⊙ masked_softmax(S))."""
    A = _masked_row_softmax(S, act)
    R = S * A
    row_norm = torch.sqrt((R * R).sum(-1, keepdim=True))
    return R / torch.clamp(row_norm, min=EPS)


def ref_pair_sets(present: torch.Tensor):
    """P[i][j] = list of sample indices holding both modalities i and j."""
    M, B = present.shape
    pres = present.cpu().tolist()
    return [[[b for b in range(B) if pres[i][b] and pres[j][b]] for j in range(M)] for i in range(M)]


def ref_active(present: torch.Tensor) -> torch.Tensor:
    M = present.shape[0]
    P = ref_pair_sets(present)
    return torch.tensor([[len(P[i][j]) >= 1 for j in range(M)] for i in range(M)], dtype=torch.bool,
                        device=present.device)


def ref_scores(embeddings, present=None, mode: str = "sample", normalize: bool = True):
    """(S, S_prime, active): S, S' are [B, M, M] (sample) or [M, M] (batch)."""
    e = as_stack(embeddings)
    present = default_present(e, present)
    M, B, _ = e.shape
    z = ref_rows(e, present, normalize)
    active = ref_active(present)
    if mode == "sample":
        S_rows = []
        act_rows = []
        for b in range(B):
            act_b = present[:, b][:, None] & present[:, b][None, :]         # [M, M]
            gram = z[:, b, :] @ z[:, b, :].T                                   # [M, M]
            S_rows.append(torch.where(act_b, gram, torch.zeros_like(gram)))
            act_rows.append(act_b)
        S = torch.stack(S_rows, 0)
        act = torch.stack(act_rows, 0)
    elif mode == "batch":
        P = ref_pair_sets(present)
        S = torch.zeros(M, M, dtype=e.dtype, device=e.device)
        entries = []
        for i in range(M):
            row = []
            for j in range(M):
                V = P[i][j]
                if len(V) == 0:
                    row.append(torch.zeros((), dtype=e.dtype, device=e.device))
                else:
                    idx = torch.tensor(V, device=e.device)
                    row.append((z[i, idx] * z[j, idx]).sum(-1).mean())
            entries.append(torch.stack(row))
        S = torch.stack(entries)
        act = active
    else:
        raise ValueError(mode)
    S_prime = _harmonize(S, act)
    return S, S_prime, active


# --------------------------------------------------------------------------- #
# §4 contrastive
# --------------------------------------------------------------------------- #
def _scale_tensor(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)


def _pair_row_weights(weights, i: int, j: int, V, like: torch.Tensor) -> torch.Tensor:
    """w_b for the samples of V (weights None, [M, M] or [B, M, M])."""
    n = len(V)
    if weights is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    if weights.dim() == 2:
        return weights[i, j].expand(n)
    idx = torch.tensor(V, device=like.device, dtype=torch.long)
    return weights[idx, i, j]


def _lse(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(x, dim=dim)


def ref_pair_loss(zi, zj, w, s, form: str, bias=0.0) -> torch.Tensor:
    """L(i, j) on the n rows zi, zj [n, D] with row weights w [n] (bias: siglip's logit_bias)."""
    n = zi.shape[0]
    if form == "siglip":
        logits = s * w[:, None] * (zi @ zj.T) + bias                  # [n(r), n(c)]
        labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
        return -torch.nn.functional.logsigmoid(labels * logits).sum() / n
    if form == "ntxent":
        u = torch.cat([zi, zj], 0)                                   # [2n, D]
        w2 = torch.cat([w, w], 0)                                    # w_b(r)
        logits = s * w2[:, None] * (u @ u.T)                          # [2n, 2n]
        eye = torch.eye(2 * n, dtype=torch.bool, device=u.device)
        lse = _lse(logits.masked_fill(eye, -math.inf), -1)            # over c != r
        pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
        positive = logits[torch.arange(2 * n, device=u.device), pos]
        return (lse - positive).sum() / (2 * n)
    if form == "clip":
        logits_ij = s * w[:, None] * (zi @ zj.T)                      # [n(r), n(c)]
        logits_ji = s * w[:, None] * (zj @ zi.T)                      # [n(c), n(r)]
        l1 = (_lse(logits_ij, -1) - torch.diagonal(logits_ij)).mean()
        l2 = (_lse(logits_ji, -1) - torch.diagonal(logits_ji)).mean()
        return 0.5 * (l1 + l2)
    raise ValueError(form)


def ref_pair_losses(embeddings, present=None, logit_scale=1 / 0.07, weights=None, form: str = "ntxent",
                    logit_bias=None, normalize: bool = True):
    """[M, M]: L(i, j) in the upper triangle for active pairs, zeros elsewhere."""
    e = as_stack(embeddings)
    present = default_present(e, present)
    M = e.shape[0]
    z = ref_rows(e, present, normalize)
    s = _scale_tensor(logit_scale, z)
    P = ref_pair_sets(present)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    rows = []
    for i in range(M):
        row = []
        for j in range(M):
            V = P[i][j]
            if i < j and len(V) >= 1:
                idx = torch.tensor(V, device=z.device, dtype=torch.long)
                w = _pair_row_weights(weights, i, j, V, z)
                row.append(ref_pair_loss(z[i, idx], z[j, idx], w, s, form, 0.0 if logit_bias is None else logit_bias))
            else:
                row.append(zero)
        rows.append(torch.stack(row))
    return torch.stack(rows)


# --------------------------------------------------------------------------- #
# linear cross-entropy (the §7 contract: F.cross_entropy on scaled logits)
# --------------------------------------------------------------------------- #
def ref_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, scale=None,
                             reduction="mean"):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if scale is not None:
        if isinstance(scale, torch.Tensor) and scale.dim() == 1:
            logits = scale[:, None] * logits
        else:
            logits = scale * logits
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    N = hidden.shape[0]
    if target.is_floating_point():
        per_row = -(target * logp).sum(-1)
        count = N
    else:
        keep = target != ignore_index
        safe_t = torch.where(keep, target, torch.zeros_like(target))
        picked = logp.gather(1, safe_t[:, None])[:, 0]
        per_row = torch.where(keep, -picked, torch.zeros_like(picked))
        count = int(keep.sum())
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        if count == 0:
            return per_row.sum() * 0.0
        return per_row.sum() / count
    raise ValueError(reduction)


# --------------------------------------------------------------------------- #
# §5 masked-modeling tasks
# --------------------------------------------------------------------------- #
@dataclass
class RefTask:
    kind: str
    hidden: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    sample_index: Optional[torch.Tensor] = None
    ignore_index: int = -100
    nce_scale: float = 1 / 0.07


def ref_masked_task(kind, hidden, target, row_weights=None, weight=None, bias=None, ignore_index=-100,
                    nce_scale=1 / 0.07):
    """L_M for one modality; row_weights [N] (None = all 1)."""
    N = hidden.shape[0]
    zero = hidden.sum() * 0.0
    if N == 0:
        return zero
    y = hidden @ weight.T if weight is not None else hidden
    if bias is not None:
        y = y + bias
    w = row_weights if row_weights is not None else torch.ones(N, dtype=y.dtype, device=y.device)
    wy = w[:, None] * y
    if kind == "ce":
        keep = target != ignore_index
        if int(keep.sum()) == 0:
            return zero
        total = zero
        for n in range(N):                         # explicit loop over rows
            if bool(keep[n]):
                total = total + (torch.logsumexp(wy[n], 0) - wy[n, int(target[n])])
        return total / int(keep.sum())
    if kind == "kl":
        logp = wy - torch.logsumexp(wy, -1, keepdim=True)
        pos = target > 0
        q_safe = torch.where(pos, target, torch.ones_like(target))
        q_log_q = torch.where(pos, target * torch.log(q_safe), torch.zeros_like(target))
        return (q_log_q - target * logp).sum() / N
    if kind == "mse":
        F_ = y.shape[1]
        return ((wy - target) ** 2).sum() / (N * F_)
    if kind == "nce":
        yh = y / torch.clamp(torch.sqrt((y * y).sum(-1, keepdim=True)), min=EPS)
        th = target / torch.clamp(torch.sqrt((target * target).sum(-1, keepdim=True)), min=EPS)
        logits = w[:, None] * nce_scale * (yh @ th.T)
        return (torch.logsumexp(logits, -1) - torch.diagonal(logits)).mean()
    raise ValueError(kind)


# --------------------------------------------------------------------------- #
# §6 total
# --------------------------------------------------------------------------- #
def ref_scale_loss(embeddings, present=None, logit_scale=1 / 0.07, tasks=None, task_embeddings=None,
                   mode="sample", form="ntxent", harmonize=True, detach_weights=False, logit_bias=None,
                   normalize=True):
    """dict(total, contrastive, masked, scores, weights, active)."""
    e = as_stack(embeddings)
    present = default_present(e, present)
    M, B, _ = e.shape
    S, Sp, active = ref_scores(e, present, mode, normalize)
    if harmonize:
        Wc = Sp.detach() if detach_weights else Sp
    else:
        Wc = None
    pair = ref_pair_losses(e, present, logit_scale, Wc, form, logit_bias, normalize)
    n_active = sum(1 for i in range(M) for j in range(i + 1, M) if bool(active[i, j]))
    contrastive_term = pair.sum() / n_active if n_active > 0 else pair.sum() * 0.0

    # weights of the masked tasks: S' of task_embeddings when given
    if harmonize and tasks:
        if task_embeddings is not None:
            _, Sp_task, _ = ref_scores(as_stack(task_embeddings), present, mode, normalize)
        else:
            Sp_task = Sp
        if detach_weights:
            Sp_task = Sp_task.detach()
    masked_entries = [torch.zeros((), dtype=e.dtype, device=e.device) for _ in range(M)]
    for m, task in (tasks or {}).items():
        N = task.hidden.shape[0]
        if harmonize:
            if mode == "sample":
                row_w = Sp_task[task.sample_index.long(), m, m] if N > 0 else None
            else:
                row_w = Sp_task[m, m].expand(N)
        else:
            row_w = None
        masked_entries[m] = ref_masked_task(task.kind, task.hidden, task.target, row_w, task.weight,
                                            task.bias, task.ignore_index, task.nce_scale)
    masked = torch.stack(masked_entries)
    total = contrastive_term + masked.sum()
    return dict(total=total, contrastive=pair, masked=masked, scores=S, weights=Sp, active=active)
