"""Fused linear cross-entropy on the compiled kernels (backend contract in _dispatch.py).

The chunk loop, its GEMMs (torch's BLAS) and the autograd op are the shared driver's
(scale_fast/backends/_lce_driver.py); the row pass is C++ (csrc, lce_rows): rows in
parallel, one fused pass adds the bias and finds the max, one sums the exponentials and
one overwrites the row with d loss / d logits (plus the scale and soft-target gradients),
where the torch backend's row pass makes about five passes.  Arithmetic in float32
(float64 for float64).  The kept rows are counted on the host (free on the CPU) and
ignored rows skipped entirely.
"""
from __future__ import annotations

from .._lce_driver import contract_op, host_engine
from ._build import loaded as _ext


def row_pass(x, g, *, bias, scale, target, ignore_index, lse_in, coef, loss, lse, dscale, dtarget):
    """The driver's row pass (contract in _lce_driver.Engine), by the C++ kernel in place on x."""
    if target.is_floating_point():
        target = target.to(x.dtype).contiguous()
    _ext().lce_rows(x, bias, scale, target, ignore_index, lse_in, coef, loss, lse, dscale, dtarget)


ENGINE = host_engine(row_pass)
linear_cross_entropy = contract_op(ENGINE)  # backend contract in _dispatch.py
