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

from .scores import accumulation_dtype

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


class NTXentPair(torch.autograd.Function):
    """NT-Xent of one pair: rows u = [a; b], positives r <-> r + n, self excluded.

    The Gram matrix u u^T is symmetric, so only tiles (R, C) with R <= C are
    formed; each gives the log-sum-exp terms of rows R and (transposed) of rows
    C, and in backward the gradients of both.
    """

    @staticmethod
    def forward(ctx, a, b, weights, scale):
        acc = accumulation_dtype(a.dtype)
        n = a.shape[0]
        u = torch.cat([a, b]).to(acc)
        w2 = None if weights is None else torch.cat([weights, weights]).to(acc)
        rs = _row_scale(scale.detach(), w2, 2 * n, u)
        lse = _RowLSE(rs)
        tiles = _tiles(2 * n, TILE)
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
        pos_dot = (u[:n] * u[n:]).sum(1).repeat(2)
        lse_all = lse.result()
        loss = (lse_all - rs * pos_dot).sum() / (2 * n)
        ctx.save_for_backward(u, w2, rs, lse_all, pos_dot, scale)
        ctx.in_dtype = a.dtype
        ctx.w_dtype = None if weights is None else weights.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        u, w2, rs, lse, pos_dot, scale = ctx.saved_tensors
        n2 = u.shape[0]
        n = n2 // 2
        coef = grad.to(u.dtype) / n2
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
        partner = torch.cat([u[n:], u[:n]])
        du -= (coef * rs)[:, None] * partner
        du[:n] -= (coef * rs[n:])[:, None] * u[n:]
        du[n:] -= (coef * rs[:n])[:, None] * u[:n]
        d_rs = coef * (dot_p / p_sum - pos_dot)  # d loss / d (s * w_r)
        da, db = du[:n].to(ctx.in_dtype), du[n:].to(ctx.in_dtype)
        dweights = dscale = None
        if ctx.needs_input_grad[2]:
            dweights = ((d_rs[:n] + d_rs[n:]) * scale.to(u.dtype)).to(ctx.w_dtype)
        if ctx.needs_input_grad[3]:
            w = torch.ones_like(rs) if w2 is None else w2
            dscale = (d_rs * w).sum().to(scale.dtype)
        return da, db, dweights, dscale


class CrossPair(torch.autograd.Function):
    """Cross-modal InfoNCE between rows a and b (positives on the diagonal).

    Row direction: logits[r, c] = s w_r a_r . b_c; column direction (when
    `both`): logits[c, r] = s w_c b_c . a_r.  Both come from the same tile of
    a b^T.  The loss is the row-direction mean, or the mean of both directions.
    """

    @staticmethod
    def forward(ctx, a, b, weights, scale, both: bool):
        acc = accumulation_dtype(a.dtype)
        n = a.shape[0]
        a32, b32 = a.to(acc), b.to(acc)
        rs = _row_scale(scale.detach(), weights, n, a32)
        lse_rows, lse_cols = _RowLSE(rs), _RowLSE(rs)
        tiles = _tiles(n, TILE)
        for rows in tiles:
            for cols in tiles:
                gram = a32[rows] @ b32[cols].T
                if both:
                    lse_cols.add(gram * rs[None, cols], cols, 0)
                lse_rows.add(gram.mul_(rs[rows, None]), rows, 1)
        pos_dot = (a32 * b32).sum(1)
        lse_r = lse_rows.result()
        loss = (lse_r - rs * pos_dot).mean()
        lse_c = lse_cols.result() if both else lse_r
        if both:
            loss = 0.5 * (loss + (lse_c - rs * pos_dot).mean())
        ctx.save_for_backward(a32, b32, weights, rs, lse_r, lse_c, pos_dot, scale)
        ctx.both = both
        ctx.in_dtypes = (a.dtype, b.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, weights, rs, lse_r, lse_c, pos_dot, scale = ctx.saved_tensors
        n = a.shape[0]
        directions = 2 if ctx.both else 1
        coef = grad.to(a.dtype) / (n * directions)
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        # per direction, as in NTXentPair.backward: sum_c P G normalised by sum_c P
        dot_p, p_sum = a.new_zeros(directions, n), a.new_zeros(directions, n)
        tiles = _tiles(n, TILE)
        for rows in tiles:
            for cols in tiles:
                gram = a[rows] @ b[cols].T
                prob = torch.exp(gram * rs[rows, None] - lse_r[rows, None])
                dot_p[0, rows] += (prob * gram).sum(1)
                p_sum[0, rows] += prob.sum(1)
                dgram = prob.mul_(coef * rs[rows, None])
                if ctx.both:
                    prob_t = torch.exp(gram * rs[None, cols] - lse_c[None, cols])
                    dot_p[1, cols] += (prob_t * gram).sum(0)
                    p_sum[1, cols] += prob_t.sum(0)
                    dgram.add_(prob_t.mul_(coef * rs[None, cols]))
                da[rows] += dgram @ b[cols]
                db[cols] += dgram.T @ a[rows]
        da -= (directions * coef * rs)[:, None] * b
        db -= (directions * coef * rs)[:, None] * a
        d_rs = coef * (dot_p / p_sum - pos_dot).sum(0)
        dweights = dscale = None
        if ctx.needs_input_grad[2]:
            dweights = (d_rs * scale.to(a.dtype)).to(weights.dtype)
        if ctx.needs_input_grad[3]:
            w = torch.ones_like(rs) if weights is None else weights.to(a.dtype)
            dscale = (d_rs * w).sum().to(scale.dtype)
        return da.to(ctx.in_dtypes[0]), db.to(ctx.in_dtypes[1]), dweights, dscale, None


def contrastive(z, present, logit_scale, row_weights, form):
    """[M, M] pair losses of every active pair i < j (backend contract in _dispatch.py)."""
    M = z.shape[0]
    acc = accumulation_dtype(z.dtype)
    scale = logit_scale.to(acc) if logit_scale.dtype != acc else logit_scale
    flat_index, values = [], []
    for i in range(M):
        for j in range(i + 1, M):
            rows = torch.nonzero(present[i] & present[j]).squeeze(1)
            if rows.numel() == 0:
                continue
            a, b = z[i].index_select(0, rows), z[j].index_select(0, rows)
            w = None if row_weights is None else row_weights[:, i, j].index_select(0, rows)
            if form == "ntxent":
                values.append(NTXentPair.apply(a, b, w, scale))
            else:
                values.append(CrossPair.apply(a, b, w, scale, True))
            flat_index.append(i * M + j)
    out = torch.zeros(M * M, dtype=acc, device=z.device)
    if values:
        index = torch.tensor(flat_index, device=z.device)
        out = out.index_put((index,), torch.stack(values).to(acc))
    return out.view(M, M)


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    acc = accumulation_dtype(a.dtype)
    s = torch.tensor(float(scale), dtype=acc, device=a.device)
    return CrossPair.apply(a, b, row_weights, s, False)
