"""The cpp backend's pair kernels for the InfoNCE losses (docs/contract.md §4): NT-Xent, CLIP (SigLIP: siglip.py).

The all-pairs driver, the pair forms and the info-NCE Functions are shared
(scale_fast/backends/_allpairs.py); each pair's tile loops run in C++: NT-Xent forms only the Gram tiles R <= C, the
log-sum-exp uses the fixed shift |s w_r| when 2 max|s w| <= 60 (float32; 600 float64) and
an online max otherwise, and the weight gradient is a sum of P (G - G_pos) products normalised
by p_sum (see the torch backend).  The positive-logit terms and the O(n) bookkeeping stay in torch.
"""
from __future__ import annotations

from .. import _allpairs
from .._allpairs import PairKernels, all_pairs, pair_forms
from ._build import loaded as _ext

# Rows of one [TILE, TILE] Gram tile: 256 x 256 float32 (256 KiB) stays in L2 with its
# operands at D = 256; 128 and 512 measured no faster on the benchmark machine.
TILE = 256


def ntxent_forward(u, rs):
    """(loss, lse [2n], pos_dot [n]) of one pair's rows u = [a; b]."""
    n2 = u.shape[0]
    n = n2 // 2
    lse = _ext().ntxent_forward(u, rs, TILE)
    pos = (u[:n] * u[n:]).sum(1)
    return (lse - rs * pos.repeat(2)).sum() / n2, lse, pos


def ntxent_backward(u, rs, lse, pos, coef):
    """(du [2n, D], d_rs [2n]) of coef * NT-Xent loss."""
    n2 = u.shape[0]
    n = n2 // 2
    c = float(coef) / n2
    du, dot_p, p_sum = _ext().ntxent_backward(u, rs, lse, pos.repeat(2), c, TILE)
    both = (c * (rs[:n] + rs[n:]))[:, None]
    du[:n].addcmul_(both, u[n:], value=-1)  # in place: no [n, D] temporary
    du[n:].addcmul_(both, u[:n], value=-1)
    return du, c * (dot_p / p_sum)


def cross_forward(a, b, rs, both: bool):
    """(loss, lse_rows, lse_cols or None, pos_dot) of cross-modal InfoNCE."""
    lse_r, lse_c = _ext().cross_forward(a, b, rs, both, TILE)
    pos = (a * b).sum(1)
    loss = (lse_r - rs * pos).mean()
    if not both:
        return loss, lse_r, None, pos
    return 0.5 * (loss + (lse_c - rs * pos).mean()), lse_r, lse_c, pos


def cross_backward(a, b, rs, lse_r, lse_c, pos, coef):
    """(da, db, d_rs) of coef * cross_forward's loss."""
    n = a.shape[0]
    directions = 1 if lse_c is None else 2
    c = float(coef) / (n * directions)
    da, db, dot_p, p_sum = _ext().cross_backward(a, b, rs, lse_r, lse_c, pos, c, TILE)
    k = (directions * c * rs)[:, None]
    da.addcmul_(k, b, value=-1)
    db.addcmul_(k, a, value=-1)
    return da, db, c * (dot_p / p_sum).sum(0)


# No row-block InfoNCE kernels: contrastive's row_range is left to the torch backend (the SigLIP
# form's row_range, siglip.py, needs only the siglip kernels).
KERNELS = PairKernels(ntxent_forward, ntxent_backward, cross_forward, cross_backward)
FORMS = pair_forms(KERNELS)


def contrastive(e, present, logit_scale, row_weights, form, *, normalize=True):
    """[M, M] pair losses of every active pair i < j from raw embeddings e (backend contract in _dispatch.py)."""
    return all_pairs(FORMS, e, present, logit_scale, row_weights, form, normalize=normalize)


def info_nce(a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task)."""
    return _allpairs.info_nce(KERNELS, a, b, row_weights, scale)
