"""The torch backend's pair kernels of the sigmoid (SigLIP) pair loss (docs/contract.md §4, form="siglip").

The all-pairs driver and the SigLIP pair form are shared (scale_fast/backends/_allpairs.py); here are
the tile loops of one pair, on the tiling and scratch of contrastive.py (its TILE, read per call).
"""
from __future__ import annotations

import torch

from .._allpairs import SigLIPKernels, all_pairs, pair_forms
from . import contrastive
from .contrastive import _WORKSPACE, _Scratch, _add_tile_sum, _self_mask, _tiles


def siglip_forward(q, k, rs, pos, bias):
    """sum_r sum_c softplus(-y_rc x_rc) of the rows q [R, D] against every row of k [C, D]:
    x_rc = rs_r q_r . k_c + bias, y_rc = +1 where c == pos[r], else -1 (form="siglip").

    softplus(-x) = softplus(x) - x: every tile sums softplus(x), the positives' x is taken off once.
    """
    total = q.new_zeros(())
    work = _Scratch(q, q.shape[0], k.shape[0], 2)
    for rows in _tiles(q.shape[0], contrastive.TILE):
        for cols in _tiles(k.shape[0], contrastive.TILE):
            gram = torch.mm(q[rows], k[cols].T, out=work.tile(0, rows, cols))
            x = torch.addcmul(bias, gram, rs[rows, None], out=work.tile(1, rows, cols))
            total += torch.ops.aten.softplus.out(x, 1, 20, out=gram).sum()  # F.softplus(x), into the scratch
    return total - (rs * (q * k.index_select(0, pos)).sum(1) + bias).sum()


def siglip_backward(q, k, rs, pos, bias, coef):
    """d x_rc = sigmoid(x_rc) - [c == pos(r)], the positives' -sigmoid(-x) (no cancellation) set in
    their tile, so that the scale's and the bias's gradients are sums of (p - y) products, the
    positive's with the Gram entry of its own tile."""
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    d_rs = torch.zeros_like(rs)
    d_bias = q.new_zeros(())
    k_pos = k.index_select(0, pos)
    d_pos = torch.sigmoid(-(rs * (q * k_pos).sum(1) + bias)).neg_()  # sigmoid(x) - 1 of the positives
    work = _Scratch(q, q.shape[0], k.shape[0], 3)
    for rows in _tiles(q.shape[0], contrastive.TILE):
        for cols in _tiles(k.shape[0], contrastive.TILE):
            gram = torch.mm(q[rows], k[cols].T, out=work.tile(0, rows, cols))
            p = torch.addcmul(bias, gram, rs[rows, None], out=work.tile(1, rows, cols)).sigmoid_()
            p = torch.where(_self_mask(pos, rows, cols, q.device), d_pos[rows, None], p, out=p)
            d_bias += p.sum()
            _add_tile_sum(d_rs[rows], torch.mul(p, gram, out=work.tile(2, rows, cols)), 1)
            p.mul_(coef * rs[rows, None])
            dq[rows].addmm_(p, k[cols])
            dk[cols].addmm_(p.T, q[rows])
    return dq, dk, coef * d_rs, coef * d_bias


KERNELS = SigLIPKernels(siglip_forward, siglip_backward, workspace=_WORKSPACE)
FORMS = pair_forms(KERNELS)


def siglip(e, present, logit_scale, logit_bias, row_weights, row_range=None, *, normalize=True, columns_grad=True):
    """[M, M] sigmoid (SigLIP) pair losses (backend contract in _dispatch.py).

    row_range=(start, stop): only the rows of samples start..stop-1 (see scale_fast/backends/_allpairs.py).
    """
    return all_pairs(FORMS, e, present, logit_scale, row_weights, "siglip", row_range, logit_bias, normalize,
                     columns_grad)
