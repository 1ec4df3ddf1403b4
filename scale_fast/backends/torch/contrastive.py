"""Chunked contrastive losses (docs/contract.md §4) as custom autograd Functions.

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

from ..._normalize import accumulation_dtype, normalize_rows, normalize_rows_backward

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

    def add_gram(self, gram: torch.Tensor, scale: torch.Tensor, rows: slice, dim: int, out: torch.Tensor,
                 self_diagonal: bool = False) -> None:
        """Fold the logits scale * gram of a tile (rows along `dim`, scale per row) into rows `rows`.

        out: scratch of gram's shape for the logits.  self_diagonal excludes the tile's
        diagonal (NT-Xent's self-similarities).  With the fixed shift, shift-scale-exp is one
        addcmul and one in-place exp.
        """
        view = (lambda v: v[:, None]) if dim == 1 else (lambda v: v[None, :])
        if self.fixed:
            terms = torch.addcmul(-view(self.shift[rows]), gram, view(scale), out=out).exp_()
            if self_diagonal:
                terms.diagonal().zero_()
            self.sumexp[rows] += terms.sum(dim)
            return
        logits = torch.mul(gram, view(scale), out=out)
        if self_diagonal:
            logits.diagonal().fill_(float("-inf"))
        self.add(logits, rows, dim)

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


class _Scratch:
    """The scratch tiles of one kernel call, allocated once and reused for every tile.

    A fresh [T, T] tensor per tile and step would leave the freed ones to the allocator,
    which keeps them resident (glibc raises its mmap threshold after large frees and then
    serves them from its heaps): resident memory would grow far beyond the live tiles.
    tiles: how many [T, T] scratch tiles; d: width of a [T, D] scratch for the gradient
    products (0: none).  T is capped at the row counts nr, nc of the two operands.
    """

    def __init__(self, like: torch.Tensor, nr: int, nc: int, tiles: int, d: int = 0):
        tr, tc = max(1, min(TILE, nr)), max(1, min(TILE, nc))
        self.tiles = like.new_empty(tiles, tr * tc)
        self.rows = like.new_empty(max(tr, tc) * d) if d else None

    def tile(self, k: int, rows: slice, cols: slice) -> torch.Tensor:
        """Scratch tile k viewed as [rows, cols] (contiguous)."""
        r, c = rows.stop - rows.start, cols.stop - cols.start
        return self.tiles[k, :r * c].view(r, c)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b [R, D] into the [T, D] scratch."""
        return torch.mm(a, b, out=self.rows[:a.shape[0] * b.shape[1]].view(a.shape[0], b.shape[1]))


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
    work = _Scratch(u, n2, n2, 2)
    tiles = _tiles(n2, TILE)
    for bi, rows in enumerate(tiles):
        for cols in tiles[bi:]:
            gram = torch.mm(u[rows], u[cols].T, out=work.tile(0, rows, cols))
            lse.add_gram(gram, rs[rows], rows, 1, work.tile(1, rows, cols), self_diagonal=cols is rows)
            if cols is not rows:
                lse.add_gram(gram, rs[cols], cols, 0, work.tile(1, rows, cols))
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
    work = _Scratch(u, n2, n2, 4, u.shape[1])
    tiles = _tiles(n2, TILE)
    for bi, rows in enumerate(tiles):
        for cols in tiles[bi:]:
            gram = torch.mm(u[rows], u[cols].T, out=work.tile(0, rows, cols))
            prob = torch.addcmul(-lse[rows, None], gram, rs[rows, None], out=work.tile(1, rows, cols)).exp_()
            tmp = work.tile(3, rows, cols)
            if cols is rows:
                prob.diagonal().zero_()
                dot_p[rows] += torch.mul(prob, gram, out=tmp).sum(1)
                p_sum[rows] += prob.sum(1)
                dgram = prob.mul_(coef * rs[rows, None])
                du[rows] += work.mm(torch.add(dgram, dgram.T, out=tmp), u[rows])
                continue
            prob_t = torch.addcmul(-lse[None, cols], gram, rs[None, cols], out=work.tile(2, rows, cols)).exp_()
            dot_p[rows] += torch.mul(prob, gram, out=tmp).sum(1)
            dot_p[cols] += torch.mul(prob_t, gram, out=tmp).sum(0)
            p_sum[rows] += prob.sum(1)
            p_sum[cols] += prob_t.sum(0)
            dgram = prob.mul_(coef * rs[rows, None]).addcmul_(prob_t, coef * rs[None, cols])
            du[rows] += work.mm(dgram, u[cols])
            du[cols] += work.mm(dgram.T, u[rows])
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
    work = _Scratch(a, n, n, 2)
    tiles = _tiles(n, TILE)
    for rows in tiles:
        for cols in tiles:
            gram = torch.mm(a[rows], b[cols].T, out=work.tile(0, rows, cols))
            if both:
                lse_cols.add_gram(gram, rs[cols], cols, 0, work.tile(1, rows, cols))
            lse_rows.add_gram(gram, rs[rows], rows, 1, work.tile(1, rows, cols))
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
    work = _Scratch(a, n, n, 4, a.shape[1])
    tiles = _tiles(n, TILE)
    for rows in tiles:
        for cols in tiles:
            gram = torch.mm(a[rows], b[cols].T, out=work.tile(0, rows, cols))
            prob = torch.addcmul(-lse_r[rows, None], gram, rs[rows, None], out=work.tile(1, rows, cols)).exp_()
            tmp = work.tile(3, rows, cols)
            dot_p[0, rows] += torch.mul(prob, gram, out=tmp).sum(1)
            p_sum[0, rows] += prob.sum(1)
            dgram = prob.mul_(coef * rs[rows, None])
            if lse_c is not None:
                prob_t = torch.addcmul(-lse_c[None, cols], gram, rs[None, cols], out=work.tile(2, rows, cols)).exp_()
                dot_p[1, cols] += torch.mul(prob_t, gram, out=tmp).sum(0)
                p_sum[1, cols] += prob_t.sum(0)
                dgram.addcmul_(prob_t, coef * rs[None, cols])
            da[rows] += work.mm(dgram, b[cols])
            db[cols] += work.mm(dgram.T, a[rows])
    da -= (directions * coef * rs)[:, None] * b
    db -= (directions * coef * rs)[:, None] * a
    return da, db, coef * (dot_p / p_sum - pos_dot).sum(0)


def _self_mask(self_idx, rows: slice, cols: slice, device):
    """[R, C] bool: True where column == the row's own index (its self-similarity), or None."""
    if self_idx is None:
        return None
    col_ids = torch.arange(cols.start, cols.stop, device=device)
    return col_ids[None, :] == self_idx[rows, None]


def rows_forward(q, k, rs, pos, self_idx=None):
    """Sum over the query rows r of (LSE_c rs_r q_r . k_c - rs_r q_r . k_pos(r)), c over every key.

    The row-block form used under a process group: q [R, D] are this rank's
    rows (unit), k [C, D] all the columns (unit), rs [R] their s * w, pos [R]
    the column of each row's positive, self_idx [R] (or None) a column to
    exclude (NT-Xent's self-similarity).  Only [T, T] tiles of q k^T are formed.
    Returns (sum, lse [R], pos_dot [R]).
    """
    lse = _RowLSE(rs)
    work = _Scratch(q, q.shape[0], k.shape[0], 1)
    for rows in _tiles(q.shape[0], TILE):
        for cols in _tiles(k.shape[0], TILE):
            logits = torch.mm(q[rows], k[cols].T, out=work.tile(0, rows, cols)).mul_(rs[rows, None])
            mask = _self_mask(self_idx, rows, cols, q.device)
            if mask is not None:
                logits.masked_fill_(mask, float("-inf"))
            lse.add(logits, rows, 1)
    pos_dot = (q * k.index_select(0, pos)).sum(1)
    lse_all = lse.result()
    return (lse_all - rs * pos_dot).sum(), lse_all, pos_dot


def rows_backward(q, k, rs, lse, pos, self_idx, pos_dot, coef):
    """(dq, dk, d_rs) of coef * rows_forward's sum, recomputing its tiles."""
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dot_p, p_sum = torch.zeros_like(rs), torch.zeros_like(rs)  # as in ntxent_backward
    work = _Scratch(q, q.shape[0], k.shape[0], 3, q.shape[1])
    for rows in _tiles(q.shape[0], TILE):
        for cols in _tiles(k.shape[0], TILE):
            gram = torch.mm(q[rows], k[cols].T, out=work.tile(0, rows, cols))
            prob = torch.mul(gram, rs[rows, None], out=work.tile(1, rows, cols)).sub_(lse[rows, None]).exp_()
            mask = _self_mask(self_idx, rows, cols, q.device)
            if mask is not None:
                prob.masked_fill_(mask, 0.0)
            dot_p[rows] += torch.mul(prob, gram, out=work.tile(2, rows, cols)).sum(1)
            p_sum[rows] += prob.sum(1)
            dgram = prob.mul_(coef * rs[rows, None])
            dq[rows] += work.mm(dgram, k[cols])
            dk[cols] += work.mm(dgram.T, q[rows])
    dq -= (coef * rs)[:, None] * k.index_select(0, pos)
    dk.index_add_(0, pos, -(coef * rs)[:, None] * q)
    return dq, dk, coef * (dot_p / p_sum - pos_dot)


def _gather_unit_rows(e, m, rows, acc):
    """(u, inv, projected): the rows `rows` of modality m, normalised (all are present)."""
    return normalize_rows(e[m].index_select(0, rows).to(acc))


class AllPairsContrastive(torch.autograd.Function):
    """Every active pair i < j in one Function, from the raw embeddings e.

    Only e (the caller's tensor, not a copy), the row indices and O(n)
    per-row statistics are saved; a pair's rows are gathered and normalised
    again in backward and their gradient is added straight into one de buffer.

    row_range=(start, stop) (the process-group path, see scale_fast/distributed.py):
    e and present hold the global batch, and only the loss terms of the rows
    whose sample lies in [start, stop) are summed (against every column),
    divided by the global normaliser; row_weights is then the local
    [stop - start, M, M].  Summing the outputs over a partition of [0, B)
    gives the full loss.
    """

    @staticmethod
    def forward(ctx, e, present, scale, row_weights, form, row_range=None):
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
                if row_range is not None:
                    local = torch.nonzero((rows >= row_range[0]) & (rows < row_range[1])).squeeze(1)
                    if local.numel() == 0:
                        continue
                    a, b = _gather_unit_rows(e, i, rows, acc)[0], _gather_unit_rows(e, j, rows, acc)[0]
                    rs = _pair_row_scale(s, row_weights, rows.index_select(0, local) - row_range[0], i, j, acc)
                    out[i, j], stats = _local_rows_forward(a, b, rs, local, form)
                    pairs.append((i, j, rows, (local, stats)))
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
        ctx.pairs, ctx.form, ctx.row_range = pairs, form, row_range
        return out

    @staticmethod
    def backward(ctx, grad):
        e, scale, row_weights = ctx.saved_tensors
        acc = accumulation_dtype(e.dtype)
        s = scale.detach().to(acc)
        de = torch.zeros(e.shape, dtype=acc, device=e.device)
        n_rows = e.shape[1] if ctx.row_range is None else ctx.row_range[1] - ctx.row_range[0]
        d_rows = torch.zeros(n_rows, e.shape[0], e.shape[0], dtype=acc, device=e.device)  # d loss / d (s w)
        for i, j, rows, stats in ctx.pairs:
            a, inv_a, proj_a = _gather_unit_rows(e, i, rows, acc)
            b, inv_b, proj_b = _gather_unit_rows(e, j, rows, acc)
            coef = grad[i, j].to(acc)
            if ctx.row_range is not None:
                local, st = stats
                w_rows = rows.index_select(0, local) - ctx.row_range[0]
                rs = _pair_row_scale(s, row_weights, w_rows, i, j, acc)
                da, db, d_rs = _local_rows_backward(a, b, rs, local, ctx.form, st, coef)
                de[i].index_add_(0, rows, normalize_rows_backward(a, da, inv_a, proj_a))
                de[j].index_add_(0, rows, normalize_rows_backward(b, db, inv_b, proj_b))
                d_rows[w_rows, i, j] = d_rs
                continue
            lse, lse_c, pos = stats
            rs = _pair_row_scale(s, row_weights, rows, i, j, acc)
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
        return de.to(e.dtype), None, dscale, dweights, None, None


def _local_row_queries(n: int, local: torch.Tensor, form: str):
    """The (query rows, positive columns, excluded columns) of one direction set, per form.

    NT-Xent: rows `local` and `local + n` of u = [a; b] against all 2n rows of u.
    clip: direction i->j queries a[local] against b, j->i queries b[local] against a;
    positives on the diagonal, nothing excluded.
    """
    if form == "ntxent":
        q_idx = torch.cat([local, local + n])
        return q_idx, torch.cat([local + n, local]), q_idx
    return local, local, None


def _local_rows_forward(a, b, rs, local, form):
    """This rank's share of pair (i, j)'s loss (global normaliser) and the stats backward needs."""
    n = a.shape[0]
    q_idx, pos, self_idx = _local_row_queries(n, local, form)
    if form == "ntxent":
        u = torch.cat([a, b])
        total, lse, pos_dot = rows_forward(u.index_select(0, q_idx), u, torch.cat([rs, rs]), pos, self_idx)
        return total / (2 * n), (lse, pos_dot)
    s1, lse1, pd1 = rows_forward(a.index_select(0, local), b, rs, pos)
    s2, lse2, pd2 = rows_forward(b.index_select(0, local), a, rs, pos)
    return 0.5 * (s1 + s2) / n, (lse1, pd1, lse2, pd2)


def _local_rows_backward(a, b, rs, local, form, stats, coef):
    """(da, db, d_rs) of coef * _local_rows_forward's loss; d_rs per local row."""
    n = a.shape[0]
    q_idx, pos, self_idx = _local_row_queries(n, local, form)
    if form == "ntxent":
        lse, pos_dot = stats
        u = torch.cat([a, b])
        dq, du, d_rs = rows_backward(u.index_select(0, q_idx), u, torch.cat([rs, rs]), lse, pos, self_idx,
                                     pos_dot, coef / (2 * n))
        du.index_add_(0, q_idx, dq)
        L = local.numel()
        return du[:n], du[n:], d_rs[:L] + d_rs[L:]
    lse1, pd1, lse2, pd2 = stats
    c = coef / (2 * n)
    dq1, db, d_rs1 = rows_backward(a.index_select(0, local), b, rs, lse1, pos, None, pd1, c)
    dq2, da, d_rs2 = rows_backward(b.index_select(0, local), a, rs, lse2, pos, None, pd2, c)
    da.index_add_(0, local, dq1)
    db.index_add_(0, local, dq2)
    return da, db, d_rs1 + d_rs2


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


def contrastive(z, present, logit_scale, row_weights, form, row_range=None):
    """[M, M] pair losses of every active pair i < j (backend contract in _dispatch.py).

    row_range=(start, stop): only the rows of samples start..stop-1 (see AllPairsContrastive).
    """
    return AllPairsContrastive.apply(z, present, logit_scale, row_weights, form,
                                     None if row_range is None else (int(row_range[0]), int(row_range[1])))


contrastive.supports_row_range = True  # scale_fast.distributed uses row_range (other backends: no)


class _InfoNCERows(torch.autograd.Function):
    """Sum over this rank's rows of the "nce" task's terms, against every rank's targets."""

    @staticmethod
    def forward(ctx, a, b, weights, scale: float, offset: int):
        acc = accumulation_dtype(a.dtype)
        a32, b32 = a.to(acc), b.to(acc)
        rs = torch.full((a.shape[0],), scale, dtype=acc, device=a.device)
        if weights is not None:
            rs = rs * weights.to(acc)
        pos = torch.arange(offset, offset + a.shape[0], device=a.device)
        total, lse, pos_dot = rows_forward(a32, b32, rs, pos)
        ctx.save_for_backward(a32, b32, rs, lse, pos_dot, pos)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype, None if weights is None else weights.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        a, b, rs, lse, pos_dot, pos = ctx.saved_tensors
        da, db, d_rs = rows_backward(a, b, rs, lse, pos, None, pos_dot, grad.to(a.dtype))
        dweights = None if ctx.dtypes[2] is None else (d_rs * ctx.scale).to(ctx.dtypes[2])
        return da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dweights, None, None


def info_nce_rows(a, b, row_weights, scale, offset):
    """sum_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_(offset+n)) over the rows a [R, F] against b [N, F].

    The row-block form of info_nce under a process group: a holds this rank's
    rows, b every rank's (gathered), and a_n's positive is b[offset + n].
    """
    return _InfoNCERows.apply(a, b, row_weights, float(scale), int(offset))


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    return _InfoNCE.apply(a, b, row_weights, float(scale))
