"""The torch backend's pair kernels for the InfoNCE losses (docs/contract.md §4: NT-Xent, CLIP; SigLIP in siglip.py).

The all-pairs driver, the pair forms and the info-NCE Functions are shared
(scale_fast/backends/_allpairs.py); here are the tile loops of one pair.

Logits are formed one [T, T] tile at a time and recomputed in backward, so the
extra memory is O(n * D + T^2) per pair instead of O(n^2).

Log-sum-exp without a max pass: every logit of row r is s * w_r * (u_r . u_c)
with unit rows, so |logit| <= |s * w_r|.  When that bound is small enough for
exp() not to under- or overflow, it is used as the row's fixed shift and the
tile sums simply add up (one pass over each tile).  Otherwise an online max is
kept per row, as in flash attention.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from .. import _allpairs
from .._allpairs import PairKernels, all_pairs, pair_forms

TILE = 1024
# Largest |logit| range for which exp(x - bound) neither over- nor underflows
# (float32 exp underflows below about -87; keep a wide margin for the sums).
_FIXED_SHIFT_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


def _add_tile_sum(acc: torch.Tensor, t: torch.Tensor, dim: int) -> None:
    """acc += t.sum(dim) of a [R, C] tile, as a product with a ones vector: BLAS gemv reads the
    tile once and adds in place, several times faster than the reduction kernel on the CPU."""
    acc.addmv_(t if dim == 1 else t.T, t.new_ones(t.shape[dim]))


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
            _add_tile_sum(self.sumexp[rows], terms, dim)
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
            _add_tile_sum(self.sumexp[rows], logits, dim)
            return
        old = self.shift[rows]
        new = torch.maximum(old, logits.amax(dim))
        safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        logits.sub_(safe[:, None] if dim == 1 else safe[None, :]).exp_()
        _add_tile_sum(self.sumexp[rows].mul_(torch.exp(old - safe)), logits, dim)
        self.shift[rows] = new

    def result(self) -> torch.Tensor:
        return self.shift + torch.log(self.sumexp)


class _Workspace(threading.local):
    """The driver's workspace (PairKernels.workspace): while it is held, the scratch of one kernel
    call is kept for the next (the pairs of one call), so that handing free pages back to the OS
    between pairs does not make every pair fault its 4-16 MiB of tiles in again."""
    held = False
    buf: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def __call__(self):
        outer = self.held
        self.held = True
        try:
            yield
        finally:
            self.held = outer
            if not outer:
                self.buf = None

    def take(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A [numel] scratch buffer of like's dtype and device: the held one when it is large enough."""
        buf = self.buf
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self.buf = buf = None  # the old one goes before the new one is made (one kernel call at a time)
            buf = like.new_empty(numel)
            if self.held:
                self.buf = buf
        return buf[:numel]


_WORKSPACE = _Workspace()


class _Scratch:
    """The scratch tiles of one kernel call, allocated once and reused for every tile.

    A fresh [T, T] tensor per tile and step would leave the freed ones to the allocator,
    which keeps them resident (glibc raises its mmap threshold after large frees and then
    serves them from its heaps): resident memory would grow far beyond the live tiles.
    tiles: how many [T, T] scratch tiles; T is capped at the row counts nr, nc of the two
    operands.  (The gradient products accumulate in place, through addmm_.)  Drawn from the
    driver's workspace when one is held.
    """

    def __init__(self, like: torch.Tensor, nr: int, nc: int, tiles: int):
        tr, tc = max(1, min(TILE, nr)), max(1, min(TILE, nc))
        self.tiles = _WORKSPACE.take(like, tiles * tr * tc).view(tiles, tr * tc)

    def tile(self, k: int, rows: slice, cols: slice) -> torch.Tensor:
        """Scratch tile k viewed as [rows, cols] (contiguous)."""
        r, c = rows.stop - rows.start, cols.stop - cols.start
        return self.tiles[k, :r * c].view(r, c)


def _tiles(n: int, tile: int):
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


def _add_scale_terms(acc: torch.Tensor, prob: torch.Tensor, gram: torch.Tensor, pos: torch.Tensor, dim: int,
                     out: torch.Tensor, positives=()) -> None:
    """acc += sum over `dim` of prob * (gram - pos), the positives' entries left out.

    The derivative of a row's LSE in its scale, less its positive logit's, is
    sum_c P[r, c] (G[r, c] - G[r, pos(r)]): formed as one sum of such products it has no
    cancellation (sum_c P G - G_pos loses the digits the two share when P[r, pos] ~ 1).
    pos: the positives' cosines of the rows along `dim` (any rounding of them: the positive's
    own entry, where the rounding would show, is left out).  positives: diagonal offsets of the
    tile that hold (row, positive) entries.  out: scratch of gram's shape (may be gram itself).
    """
    terms = torch.sub(gram, pos[:, None] if dim == 1 else pos[None, :], out=out).mul_(prob)
    for off in positives:
        terms.diagonal(off).zero_()
    _add_tile_sum(acc, terms, dim)


def _diagonal_offsets(rows: slice, cols: slice, shifts) -> list:
    """Offsets of the tile diagonals (entries (r, r + off)) holding the global entries (i, i + shift)."""
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    offs = [rows.start + shift - cols.start for shift in shifts]
    return [off for off in offs if -nr < off < nc]


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
    # dot_p[r] = sum_{c != pos(r)} P[r, c] (G[r, c] - G[r, pos(r)]) (_add_scale_terms): d_rs[r]
    # once divided by p_sum[r] = sum_c P[r, c] (1 up to rounding), so that the rounding of lse cancels
    dot_p, p_sum = torch.zeros_like(rs), torch.zeros_like(rs)
    work = _Scratch(u, n2, n2, 4)
    tiles = _tiles(n2, TILE)
    for bi, rows in enumerate(tiles):
        for cols in tiles[bi:]:
            gram = torch.mm(u[rows], u[cols].T, out=work.tile(0, rows, cols))
            prob = torch.addcmul(-lse[rows, None], gram, rs[rows, None], out=work.tile(1, rows, cols)).exp_()
            prob_t = torch.addcmul(-lse[None, cols], gram, rs[None, cols], out=work.tile(2, rows, cols)).exp_()
            tmp = work.tile(3, rows, cols)
            positives = _diagonal_offsets(rows, cols, (n, -n))  # the entries (r, r +- n)
            if cols is rows:
                # a symmetric Gram tile: prob_t[r, c] = P[c, r], so dG = A + A^T is formed in
                # place as in the other tiles (no transposed pass); its rows give every sum
                prob.diagonal().zero_()
                prob_t.diagonal().zero_()
                _add_scale_terms(dot_p[rows], prob, gram, pos_dot[rows], 1, tmp, positives)
                _add_tile_sum(p_sum[rows], prob, 1)
                dgram = prob.mul_(coef * rs[rows, None]).addcmul_(prob_t, coef * rs[None, cols])
                du[rows].addmm_(dgram, u[rows])
                continue
            _add_scale_terms(dot_p[rows], prob, gram, pos_dot[rows], 1, tmp, positives)
            _add_scale_terms(dot_p[cols], prob_t, gram, pos_dot[cols], 0, gram, positives)  # gram's last use
            _add_tile_sum(p_sum[rows], prob, 1)
            _add_tile_sum(p_sum[cols], prob_t, 0)
            dgram = prob.mul_(coef * rs[rows, None]).addcmul_(prob_t, coef * rs[None, cols])
            du[rows].addmm_(dgram, u[cols])
            du[cols].addmm_(dgram.T, u[rows])
    # the positive logits' -s * w_r * (u_r . u_p(r)) terms
    both = (coef * (rs[:n] + rs[n:]))[:, None]
    du[:n].addcmul_(both, u[n:], value=-1)  # in place: no [n, D] temporary
    du[n:].addcmul_(both, u[:n], value=-1)
    return du, coef * (dot_p / p_sum)


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
    # per direction, as in ntxent_backward: sum_{c != r} P (G - G_pos) normalised by sum_c P
    dot_p, p_sum = a.new_zeros(directions, n), a.new_zeros(directions, n)
    work = _Scratch(a, n, n, 4)
    tiles = _tiles(n, TILE)
    for rows in tiles:
        for cols in tiles:
            gram = torch.mm(a[rows], b[cols].T, out=work.tile(0, rows, cols))
            prob = torch.addcmul(-lse_r[rows, None], gram, rs[rows, None], out=work.tile(1, rows, cols)).exp_()
            tmp = work.tile(3, rows, cols)
            positives = _diagonal_offsets(rows, cols, (0,))
            _add_scale_terms(dot_p[0, rows], prob, gram, pos_dot[rows], 1, tmp, positives)
            _add_tile_sum(p_sum[0, rows], prob, 1)
            dgram = prob.mul_(coef * rs[rows, None])
            if lse_c is not None:
                prob_t = torch.addcmul(-lse_c[None, cols], gram, rs[None, cols], out=work.tile(2, rows, cols)).exp_()
                _add_scale_terms(dot_p[1, cols], prob_t, gram, pos_dot[cols], 0, tmp, positives)
                _add_tile_sum(p_sum[1, cols], prob_t, 0)
                dgram.addcmul_(prob_t, coef * rs[None, cols])
            da[rows].addmm_(dgram, b[cols])
            db[cols].addmm_(dgram.T, a[rows])
    k = (directions * coef * rs)[:, None]
    da.addcmul_(k, b, value=-1)
    db.addcmul_(k, a, value=-1)
    return da, db, coef * (dot_p / p_sum).sum(0)


def _self_mask(self_idx, rows: slice, cols: slice, device):
    """[R, C] bool: True where the column is the row's entry of self_idx (its self-similarity, or its
    positive), or None."""
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
    work = _Scratch(q, q.shape[0], k.shape[0], 3)
    for rows in _tiles(q.shape[0], TILE):
        for cols in _tiles(k.shape[0], TILE):
            gram = torch.mm(q[rows], k[cols].T, out=work.tile(0, rows, cols))
            prob = torch.mul(gram, rs[rows, None], out=work.tile(1, rows, cols)).sub_(lse[rows, None]).exp_()
            mask = _self_mask(self_idx, rows, cols, q.device)
            if mask is not None:
                prob.masked_fill_(mask, 0.0)
            terms = torch.sub(gram, pos_dot[rows, None], out=work.tile(2, rows, cols)).mul_(prob)
            terms.masked_fill_(_self_mask(pos, rows, cols, q.device), 0.0)  # the positives (_add_scale_terms)
            _add_tile_sum(dot_p[rows], terms, 1)
            _add_tile_sum(p_sum[rows], prob, 1)
            dgram = prob.mul_(coef * rs[rows, None])
            dq[rows].addmm_(dgram, k[cols])
            dk[cols].addmm_(dgram.T, q[rows])
    dq -= (coef * rs)[:, None] * k.index_select(0, pos)
    dk.index_add_(0, pos, -(coef * rs)[:, None] * q)
    return dq, dk, coef * (dot_p / p_sum)


KERNELS = PairKernels(ntxent_forward, ntxent_backward, cross_forward, cross_backward, rows_forward, rows_backward,
                      workspace=_WORKSPACE)
FORMS = pair_forms(KERNELS)


def contrastive(e, present, logit_scale, row_weights, form, row_range=None, *, normalize=True, columns_grad=True):
    """[M, M] pair losses of every active pair i < j (backend contract in _dispatch.py).

    row_range=(start, stop): only the rows of samples start..stop-1 (see scale_fast/backends/_allpairs.py).
    """
    return all_pairs(FORMS, e, present, logit_scale, row_weights, form, row_range, None, normalize, columns_grad)


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    return _allpairs.info_nce(KERNELS, a, b, row_weights, scale)


def info_nce_rows(a, b, row_weights, scale, offset):
    """The row-block form of info_nce under a process group (see scale_fast/backends/_allpairs.py)."""
    return _allpairs.info_nce_rows(KERNELS, a, b, row_weights, scale, offset)
