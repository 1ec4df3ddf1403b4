"""All-pairs contrastive losses (docs/contract.md §4) on the compiled tile kernels.

Same structure as scale_fast/backends/torch/contrastive.py (one autograd.Function over
every active pair, the raw embeddings saved once, rows re-gathered and re-normalised in
backward, O(n) statistics per pair), with each pair's tile loops in C++: NT-Xent forms only the Gram tiles R <= C, the
log-sum-exp uses the fixed shift |s w_r| when 2 max|s w| <= 60 (float32; 600 float64) and
an online max otherwise, and the weight gradient is normalised by p_sum (see the torch
backend).  The positive-logit terms and the O(n) bookkeeping stay in torch.
"""
from __future__ import annotations

import torch

from ..._normalize import accumulation_dtype, normalize_rows_backward
# the row gathering and row scales are the torch backend's (their results are contiguous)
from ..torch.contrastive import _gather_unit_rows, _pair_row_scale
from . import _build

# Rows of one [TILE, TILE] Gram tile: 256 x 256 float32 (256 KiB) stays in L2 with its
# operands at D = 256; 128 and 512 measured no faster on the benchmark machine.
TILE = 256


def _ext():
    ext = _build.extension()
    if ext is None:  # pragma: no cover - the dispatcher only routes here when built
        raise RuntimeError(f"backend='cpp' is not available: {_build.reason()}")
    return ext


def ntxent_forward(u, rs):
    """(loss, lse [2n], pos_dot [n]) of one pair's rows u = [a; b]."""
    n2 = u.shape[0]
    n = n2 // 2
    lse = _ext().ntxent_forward(u, rs, TILE)
    pos = (u[:n] * u[n:]).sum(1)
    return (lse - rs * pos.repeat(2)).sum() / n2, lse, pos


def ntxent_backward(u, rs, lse, pos, coef: float):
    """(du [2n, D], d_rs [2n]) of coef * NT-Xent loss."""
    n2 = u.shape[0]
    n = n2 // 2
    c = coef / n2
    du, dot_p, p_sum = _ext().ntxent_backward(u, rs, lse, c, TILE)
    both = (c * (rs[:n] + rs[n:]))[:, None]
    du[:n].sub_(both * u[n:])
    du[n:].sub_(both * u[:n])
    return du, c * (dot_p / p_sum - pos.repeat(2))


def cross_forward(a, b, rs, both: bool):
    """(loss, lse_rows, lse_cols or None, pos_dot) of cross-modal InfoNCE."""
    lse_r, lse_c = _ext().cross_forward(a, b, rs, both, TILE)
    pos = (a * b).sum(1)
    loss = (lse_r - rs * pos).mean()
    if not both:
        return loss, lse_r, None, pos
    return 0.5 * (loss + (lse_c - rs * pos).mean()), lse_r, lse_c, pos


def cross_backward(a, b, rs, lse_r, lse_c, pos, coef: float):
    """(da, db, d_rs) of coef * cross_forward's loss."""
    n = a.shape[0]
    directions = 1 if lse_c is None else 2
    c = coef / (n * directions)
    da, db, dot_p, p_sum = _ext().cross_backward(a, b, rs, lse_r, lse_c, c, TILE)
    k = (directions * c * rs)[:, None]
    da.sub_(k * b)
    db.sub_(k * a)
    return da, db, c * (dot_p / p_sum - pos).sum(0)


class AllPairsContrastive(torch.autograd.Function):
    """Every active pair i < j in one Function, from the raw embeddings e (see the torch backend's twin).

    Only e (the caller's tensor), the row indices and O(n) per-row statistics are saved; a
    pair's rows are gathered and normalised again in backward.
    """

    @staticmethod
    def forward(ctx, e, present, scale, row_weights, form):
        M = e.shape[0]
        acc = accumulation_dtype(e.dtype)
        s = scale.detach().to(acc)
        out = torch.zeros(M, M, dtype=acc, device=e.device)
        pairs = []
        for i in range(M):
            for j in range(i + 1, M):
                rows = torch.nonzero(present[i] & present[j]).squeeze(1)
                if rows.numel() == 0:
                    continue
                rs = _pair_row_scale(s, row_weights, rows, i, j, acc)
                a, b = _gather_unit_rows(e, i, rows, acc)[0], _gather_unit_rows(e, j, rows, acc)[0]
                if form == "ntxent":
                    out[i, j], lse, pos = ntxent_forward(torch.cat([a, b]), torch.cat([rs, rs]))
                    stats = (lse, None, pos)
                else:
                    out[i, j], lse_r, lse_c, pos = cross_forward(a, b, rs, True)
                    stats = (lse_r, lse_c, pos)
                pairs.append((i, j, rows, stats))
        ctx.save_for_backward(e, scale, row_weights)
        ctx.pairs, ctx.form = pairs, form
        return out

    @staticmethod
    def backward(ctx, grad):
        e, scale, row_weights = ctx.saved_tensors
        acc = accumulation_dtype(e.dtype)
        s = scale.detach().to(acc)
        de = torch.zeros(e.shape, dtype=acc, device=e.device)
        d_rows = torch.zeros(e.shape[1], e.shape[0], e.shape[0], dtype=acc, device=e.device)  # d loss / d (s w)
        coefs = grad.to(acc).tolist()
        for i, j, rows, (lse, lse_c, pos) in ctx.pairs:
            coef = coefs[i][j]
            if coef == 0.0:  # this pair's loss is not used: its gradient is exactly 0
                continue
            rs = _pair_row_scale(s, row_weights, rows, i, j, acc)
            a, inv_a, proj_a = _gather_unit_rows(e, i, rows, acc)
            b, inv_b, proj_b = _gather_unit_rows(e, j, rows, acc)
            if ctx.form == "ntxent":
                n = rows.numel()
                du, d_rs = ntxent_backward(torch.cat([a, b]), torch.cat([rs, rs]), lse, pos, coef)
                da, db, d_rs = du[:n], du[n:], d_rs[:n] + d_rs[n:]
            else:
                da, db, d_rs = cross_backward(a, b, rs, lse, lse_c, pos, coef)
            de[i].index_add_(0, rows, normalize_rows_backward(a, da, inv_a, proj_a))
            de[j].index_add_(0, rows, normalize_rows_backward(b, db, inv_b, proj_b))
            d_rows[rows, i, j] = d_rs
        dweights = dscale = None
        if ctx.needs_input_grad[3]:
            dweights = (d_rows * s).to(row_weights.dtype)
        if ctx.needs_input_grad[2]:
            w = 1.0 if row_weights is None else row_weights.to(acc)
            dscale = (d_rows * w).sum().to(scale.dtype)
        return de.to(e.dtype), None, dscale, dweights, None


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weights, scale: float):
        acc = accumulation_dtype(a.dtype)
        a32, b32 = a.to(acc).contiguous(), b.to(acc).contiguous()
        rs = torch.full((a.shape[0],), scale, dtype=acc, device=a.device)
        if weights is not None:
            rs = (rs * weights.to(acc)).contiguous()
        loss, lse, _, pos = cross_forward(a32, b32, rs, False)
        ctx.save_for_backward(a32, b32, rs, lse, pos)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype, None if weights is None else weights.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, rs, lse, pos = ctx.saved_tensors
        da, db, d_rs = cross_backward(a, b, rs, lse, None, pos, float(grad))
        dweights = None if ctx.dtypes[2] is None else (d_rs * ctx.scale).to(ctx.dtypes[2])
        return da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dweights, None


def contrastive(e, present, logit_scale, row_weights, form):
    """[M, M] pair losses of every active pair i < j from raw embeddings e (backend contract in _dispatch.py)."""
    return AllPairsContrastive.apply(e, present, logit_scale, row_weights, form)


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    return _InfoNCE.apply(a, b, row_weights, float(scale))
