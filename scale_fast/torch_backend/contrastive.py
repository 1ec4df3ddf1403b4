"""Chunked contrastive losses (SPEC section 4) as custom autograd Functions.

Logits are formed one [T, T] tile at a time and recomputed in backward, so the
extra memory is O(n * D + T^2) per pair instead of O(n^2).

Log-sum-exp without a max pass: every logit of row r is s * w_r * (u_r . u_c)
with unit rows, so |logit| <= |s * w_r|.  When that bound is small enough for
exp() not to under- or overflow, it is used as the row's fixed shift and the
tile sums simply add up (one pass over each tile).  Otherwise an online max is
kept per row, as in flash attention.
"""
from __future__ import annotations

import torch

from .._normalize import accumulation_dtype, normalize_rows, normalize_rows_backward

TILE = 1024
# Largest |logit| range for which exp(x - bound) neither over- nor underflows
# (float32 exp underflows below about -87; keep a wide margin for the sums).
_FIXED_SHIFT_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


class _RowLSE:
    """Accumulates log-sum-exp of many tiles for a set of rows."""

    def __init__(self, bound: torch.Tensor):
        self.fixed = bool(2 * bound.abs().max() <= _FIXED_SHIFT_RANGE[bound.dtype]) if bound.numel() else True
        self.shift = bound.abs().clone() if self.fixed else torch.full_like(bound, float("-inf"))
        self.sumexp = torch.zeros_like(bound)

    def add(self, logits: torch.Tensor, rows: slice, dim: int) -> None:
        """Fold a tile of logits (rows along `dim` of the tile) into rows `rows`; clobbers `logits`."""
        if self.fixed:
            shift = self.shift[rows]
            logits.sub_(shift[:, None] if dim == 1 else shift[None, :]).exp_()
            self.sumexp[rows] += logits.sum(dim)
            return
        old = self.shift[rows]
        new = torch.maximum(old, logits.amax(dim))
        safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        logits.sub_(safe[:, None] if dim == 1 else safe[None, :]).exp_()
        self.sumexp[rows] = self.sumexp[rows] * torch.exp(old - safe) + logits.sum(dim)
        self.shift[rows] = new

    def result(self) -> torch.Tensor:
        return self.shift + torch.log(self.sumexp)


def _tiles(n: int, tile: int):
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


def _row_scale(scale: torch.Tensor, weights: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """s * w_r for every row (w = 1 when weights is None)."""
    if weights is None:
        return scale.expand(n).to(like.dtype).contiguous()
    return scale.to(like.dtype) * weights.to(like.dtype)


def ntxent_forward(u: torch.Tensor, rs: torch.Tensor):
    """NT-Xent of one pair from rows u = [a; b] (positives r <-> r + n, self excluded).

    rs[r] = s * w_r.  The Gram matrix u u^T is symmetric, so only tiles (R, C)
    with R <= C are formed; each gives the log-sum-exp terms of rows R and
    (transposed) of rows C.  Returns (loss, lse [2n], pos_dot [2n]).
    """
    n2 = u.shape[0]
    lse = _RowLSE(rs)
    tiles = _tiles(n2, TILE)
    for bi, rows in enumerate(tiles):
        for cols in tiles[bi:]:
            gram = u[rows] @ u[cols].T
            if cols is rows:
                logits = gram.mul_(rs[rows, None])
                logits.diagonal().fill_(float("-inf"))
                lse.add(logits, rows, 1)
            else:
                col_logits = gram * rs[None, cols]
                lse.add(gram.mul_(rs[rows, None]), rows, 1)
                lse.add(col_logits, cols, 0)
    half = n2 // 2
    pos_dot = (u[:half] * u[half:]).sum(1).repeat(2)
    lse_all = lse.result()
    return (lse_all - rs * pos_dot).sum() / n2, lse_all, pos_dot


def ntxent_backward(u, rs, lse, pos_dot, coef):
    """(du, d_rs) of coef * NT-Xent loss, recomputing the tiles of ntxent_forward."""
    n2 = u.shape[0]
    n = n2 // 2
    coef = coef / n2
    du = torch.zeros_like(u)
    # dot_p[r] = sum_c P[r, c] * G[r, c]: the derivative of row r's LSE in its scale.
    # It is divided by p_sum[r] = sum_c P[r, c] (1 up to rounding) so that the
    # rounding of lse cancels: d_rs is a small difference of O(1) terms.
    dot_p, p_sum = torch.zeros_like(rs), torch.zeros_like(rs)
    tiles = _tiles(n2, TILE)
    for bi, rows in enumerate(tiles):
        for cols in tiles[bi:]:
            gram = u[rows] @ u[cols].T
            prob = torch.exp(gram * rs[rows, None] - lse[rows, None])
            if cols is rows:
                prob.diagonal().zero_()
                dot_p[rows] += (prob * gram).sum(1)
                p_sum[rows] += prob.sum(1)
                dgram = prob.mul_(coef * rs[rows, None])
                du[rows] += (dgram + dgram.T) @ u[rows]
                continue
            prob_t = torch.exp(gram * rs[None, cols] - lse[None, cols])
            dot_p[rows] += (prob * gram).sum(1)
            dot_p[cols] += (prob_t * gram).sum(0)
            p_sum[rows] += prob.sum(1)
            p_sum[cols] += prob_t.sum(0)
            dgram = prob.mul_(coef * rs[rows, None]).add_(prob_t.mul_(coef * rs[None, cols]))
            du[rows] += dgram @ u[cols]
            du[cols] += dgram.T @ u[rows]
    # the positive logits' -s * w_r * (u_r . u_p(r)) terms
    du[:n] -= (coef * (rs[:n] + rs[n:]))[:, None] * u[n:]
    du[n:] -= (coef * (rs[:n] + rs[n:]))[:, None] * u[:n]
    return du, coef * (dot_p / p_sum - pos_dot)


def cross_forward(a, b, rs, both: bool):
    """Cross-modal InfoNCE of rows a against rows b (positives on the diagonal).

    Row direction: logits[r, c] = rs_r a_r . b_c; column direction (when
    `both`): logits[c, r] = rs_c b_c . a_r, from the same tile of a b^T.  The
    loss is the row-direction mean, or the mean of both directions.
    Returns (loss, lse_rows, lse_cols or None, pos_dot).
    """
    n = a.shape[0]
    lse_rows, lse_cols = _RowLSE(rs), (_RowLSE(rs) if both else None)
    tiles = _tiles(n, TILE)
    for rows in tiles:
        for cols in tiles:
            gram = a[rows] @ b[cols].T
            if both:
                lse_cols.add(gram * rs[None, cols], cols, 0)
            lse_rows.add(gram.mul_(rs[rows, None]), rows, 1)
    pos_dot = (a * b).sum(1)
    lse_r = lse_rows.result()
    loss = (lse_r - rs * pos_dot).mean()
    if not both:
        return loss, lse_r, None, pos_dot
    lse_c = lse_cols.result()
    return 0.5 * (loss + (lse_c - rs * pos_dot).mean()), lse_r, lse_c, pos_dot


def cross_backward(a, b, rs, lse_r, lse_c, pos_dot, coef):
    """(da, db, d_rs) of coef * cross_forward's loss, recomputing its tiles."""
    n = a.shape[0]
    directions = 1 if lse_c is None else 2
    coef = coef / (n * directions)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    # per direction, as in ntxent_backward: sum_c P G normalised by sum_c P
    dot_p, p_sum = a.new_zeros(directions, n), a.new_zeros(directions, n)
    tiles = _tiles(n, TILE)
    for rows in tiles:
        for cols in tiles:
            gram = a[rows] @ b[cols].T
            prob = torch.exp(gram * rs[rows, None] - lse_r[rows, None])
            dot_p[0, rows] += (prob * gram).sum(1)
            p_sum[0, rows] += prob.sum(1)
            dgram = prob.mul_(coef * rs[rows, None])
            if lse_c is not None:
                prob_t = torch.exp(gram * rs[None, cols] - lse_c[None, cols])
                dot_p[1, cols] += (prob_t * gram).sum(0)
                p_sum[1, cols] += prob_t.sum(0)
                dgram.add_(prob_t.mul_(coef * rs[None, cols]))
            da[rows] += dgram @ b[cols]
            db[cols] += dgram.T @ a[rows]
    da -= (directions * coef * rs)[:, None] * b
    db -= (directions * coef * rs)[:, None] * a
    return da, db, coef * (dot_p / p_sum - pos_dot).sum(0)


def _gather_unit_rows(e, m, rows, acc):
    """(u, inv, projected): the rows `rows` of modality m, normalised (all are present)."""
    return normalize_rows(e[m].index_select(0, rows).to(acc))


class AllPairsContrastive(torch.autograd.Function):
    """Every active pair i < j in one Function, from the raw embeddings e.

    Only e (the caller's tensor, not a copy), the row indices and O(n)
    per-row statistics are saved; a pair's rows are gathered and normalised
    again in backward and their gradient is added straight into one de buffer.
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
        for i, j, rows, (lse, lse_c, pos) in ctx.pairs:
            rs = _pair_row_scale(s, row_weights, rows, i, j, acc)
            a, inv_a, proj_a = _gather_unit_rows(e, i, rows, acc)
            b, inv_b, proj_b = _gather_unit_rows(e, j, rows, acc)
            coef = grad[i, j].to(acc)
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


def _pair_row_scale(s, row_weights, rows, i, j, acc):
    """s * w_b for the rows of pair (i, j) (w = 1 without weights)."""
    if row_weights is None:
        return s.expand(rows.numel()).contiguous()
    return s * row_weights[:, i, j].index_select(0, rows).to(acc)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weights, scale: float):
        acc = accumulation_dtype(a.dtype)
        a32, b32 = a.to(acc), b.to(acc)
        rs = torch.full((a.shape[0],), scale, dtype=acc, device=a.device)
        if weights is not None:
            rs = rs * weights.to(acc)
        loss, lse, _, pos = cross_forward(a32, b32, rs, False)
        ctx.save_for_backward(a32, b32, rs, lse, pos)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype, None if weights is None else weights.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, rs, lse, pos = ctx.saved_tensors
        da, db, d_rs = cross_backward(a, b, rs, lse, None, pos, grad.to(a.dtype))
        dweights = None if ctx.dtypes[2] is None else (d_rs * ctx.scale).to(ctx.dtypes[2])
        return da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dweights, None


def contrastive(z, present, logit_scale, row_weights, form):
    """[M, M] pair losses of every active pair i < j (backend contract in _dispatch.py)."""
    return AllPairsContrastive.apply(z, present, logit_scale, row_weights, form)


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    return _InfoNCE.apply(a, b, row_weights, float(scale))
