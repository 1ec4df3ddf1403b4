"""The cpp backend's sigmoid (SigLIP) pair loss (docs/contract.md §4, form="siglip").

The all-pairs driver and the SigLIP pair form are shared (scale_fast/backends/_allpairs.py); the loss
runs whole in C++ (csrc/siglip.cpp), the positives included, on the tile size of contrastive.py (its
TILE, read per call).
"""
from __future__ import annotations

from .._allpairs import SigLIPKernels, all_pairs, pair_forms
from . import contrastive
from ._build import loaded as _ext


def siglip_forward(q, k, rs, pos, bias):
    """sum_r sum_c softplus(-y_rc (rs_r q_r . k_c + bias)) of the rows q against every row of k."""
    return _ext().siglip_forward(q, k, rs, pos, float(bias), contrastive.TILE)


def siglip_backward(q, k, rs, pos, bias, coef):
    """(dq, dk, d_rs, d_bias) of coef * siglip_forward's sum."""
    return tuple(_ext().siglip_backward(q, k, rs, pos, float(bias), float(coef), contrastive.TILE))


# Its row_range form needs only these kernels (each query row against every key).
KERNELS = SigLIPKernels(siglip_forward, siglip_backward)
FORMS = pair_forms(KERNELS)


def siglip(e, present, logit_scale, logit_bias, row_weights, row_range=None, *, normalize=True, columns_grad=True):
    """[M, M] sigmoid (SigLIP) pair losses (backend contract in _dispatch.py).

    row_range=(start, stop): only the rows of samples start..stop-1 (see scale_fast/backends/_allpairs.py).
    """
    return all_pairs(FORMS, e, present, logit_scale, row_weights, "siglip", row_range, logit_bias, normalize,
                     columns_grad)
