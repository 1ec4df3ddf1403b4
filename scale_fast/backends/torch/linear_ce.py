"""Chunked linear cross-entropy (docs/contract.md §7, linear_cross_entropy) in plain torch.

The chunk loop, the gradient formed during the forward and the autograd op are the shared
driver's (scale_fast/backends/_lce_driver.py); this module is its row pass in torch ops,
working in place on the chunk's logits buffer (no [rows, K] temporary except a copy of the
raw logits when the row scale needs a gradient, and the float32 copy of 16-bit soft targets).
GEMMs run in the accumulation dtype (float32, float64 for float64).  On the CPU the kept rows
are counted on the host (free there) and ignored rows are skipped entirely.
"""
from __future__ import annotations

import torch

from .._lce_driver import contract_op, host_engine



def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a[r, k] b[r, k] per row, without an [R, K] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def row_pass(x, g, *, bias, scale, target, ignore_index, lse_in, coef, loss, lse, dscale, dtarget):
    """The driver's row pass (contract in _lce_driver.Engine), in torch ops on x in place."""
    if bias is not None:
        x.add_(bias)
    raw = x.clone() if dscale is not None else None  # d scale needs the unscaled logits
    if scale is not None:
        x.mul_(scale[:, None])  # z = s * raw
    soft = target.is_floating_point()
    if soft:
        q = target.to(x.dtype)
        lw = q.sum(1)  # weight of the log-sum-exp in the loss
        picked = _rowdot(q, x) if lse_in is None else None  # sum_k q_k z_k
    else:
        valid = target != ignore_index
        col = torch.where(valid, target, torch.zeros_like(target))[:, None]
        lw = valid.to(x.dtype)
        picked = x.gather(1, col).squeeze(1) * lw if lse_in is None else None
    if dtarget is not None:  # d loss / d q_k = lse - z_k: take -z before the softmax overwrites it
        torch.neg(x, out=dtarget)
    if lse_in is None:
        top = x.amax(1)  # amax, not max: the index-tracking max(1) takes 7x as long on the CPU
        # torch's fused softmax works row by row while the row is in cache (3 passes over the chunk
        # in all, where max / sub / exp / sum / div would stream it 8 times); in place
        torch._softmax(x, 1, False, out=x)
        row_lse = top - x.amax(1).log()  # the softmax at the max is 1 / sum
        lse.copy_(row_lse)
        loss.copy_(row_lse * lw - picked)
    else:
        row_lse = lse_in
        x.sub_(lse_in[:, None]).exp_()  # the softmax itself
    if g is None:
        return
    c = coef
    if dtarget is not None:
        dtarget.add_(row_lse[:, None]).mul_(c[:, None])
    f = c if scale is None else scale * c  # d raw = d z * s, every row times c
    if dscale is not None:  # c * sum_k (p_k lw - q_k) raw_k
        q_raw = _rowdot(q, raw) if soft else raw.gather(1, col).squeeze(1) * lw
        dscale.copy_((_rowdot(x, raw) * lw - q_raw) * c)
    x.mul_((lw * f)[:, None])  # softmax * lw * s * c
    if soft:
        x.addcmul_(q, f[:, None], value=-1.0)
    else:
        x.scatter_add_(1, col, -(lw * f)[:, None])


ENGINE = host_engine(row_pass)
linear_cross_entropy = contract_op(ENGINE)  # backend contract in _dispatch.py
