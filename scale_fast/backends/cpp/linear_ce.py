"""Fused linear cross-entropy on the compiled kernels (backend contract in _dispatch.py).

The C++ sweep (csrc/linear_ce.cpp, lce_sweep) walks the rows in blocks: one GEMM
forms a block of [rows, K] logits, ONE fused pass per row adds the bias, finds the max,
sums the exponentials, picks the target and overwrites the row with d loss / d logits
(plus the scale, soft-target and bias gradients), then two GEMMs give d hidden (written in
place) and d weight (accumulated in place).  For reductions "mean"/"sum" the gradients are
computed in forward (3 GEMM passes in all, as in the torch backend) and handed to autograd
without a copy; reduction "none" (or a second backward through a retained graph)
recomputes the sweep with the saved per-row log-sum-exp.
"""
from __future__ import annotations

import torch

from ..._normalize import accumulation_dtype
from . import _build

# Elements of one [rows, K] logits block: 2^24 float32 = 64 MiB (K = 21128: 794 rows).  Each
# block streams the whole weight through the three GEMMs, so taller blocks run faster (2^24
# measured ~4% faster than 2^23 and ~8% faster than 2^22 on the benchmark machine); the peak
# (the block, d weight and d hidden) stays well below the torch backend's, see
# benchmarks/results/cpp_cpu.md.
BLOCK_ELEMENTS = 1 << 24


def _ext():
    ext = _build.extension()
    if ext is None:  # pragma: no cover - the dispatcher only routes here when built
        raise RuntimeError(f"backend='cpp' is not available: {_build.reason()}")
    return ext


def _block_rows(k: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(k, 1))


class _Inputs:
    """The inputs in the form the C++ sweep takes (accumulation dtype, contiguous)."""

    def __init__(self, hidden, weight, bias, scale, target):
        self.acc = acc = accumulation_dtype(hidden.dtype)
        self.hidden = hidden  # converted block by block in C++
        self.weight = weight.to(acc).contiguous()
        self.bias = None if bias is None else bias.to(acc).contiguous()
        self.scale = None if scale is None else scale.to(acc).contiguous()
        self.target = target if target.is_floating_point() else target.contiguous()

    def sweep(self, ignore_index, lse, coef, needs):
        return _ext().lce_sweep(self.hidden, self.weight, self.bias, self.scale, self.target, ignore_index, lse, coef,
                                [bool(x) for x in needs], _block_rows(self.weight.shape[0]))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, target, ignore_index, reduction):
        p = _Inputs(hidden, weight, bias, scale, target)
        n = hidden.shape[0]
        if target.is_floating_point():
            count = torch.tensor(float(n), dtype=p.acc)
        else:
            count = (target != ignore_index).sum().to(p.acc)
        needs = tuple(ctx.needs_input_grad[:5])
        eager = reduction != "none" and any(needs)
        factor = (1.0 / count.clamp(min=1)) if reduction == "mean" else torch.ones((), dtype=p.acc)
        coef = factor.expand(n).contiguous() if eager else None
        losses, lse, *grads = p.sweep(ignore_index, None, coef, needs)
        out = losses if reduction == "none" else losses.sum() * factor
        ctx.reduction, ctx.ignore_index, ctx.factor = reduction, ignore_index, factor
        ctx.grads = grads if eager else None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if scale is None else scale.dtype, target.dtype)
        if any(needs):  # references only (plus lse [N]): a recompute needs them
            ctx.save_for_backward(hidden, weight, bias, scale, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, scale, target, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if ctx.grads is not None:
            # computed in forward for coef = factor: scale by grad_out in place and hand the
            # buffers over (no copy); a second backward (retained graph) recomputes below
            grads, ctx.grads = ctx.grads, None
            g = grad_out.to(lse.dtype)
            if not bool(g == 1):
                grads = [None if t is None else t.mul_(g) for t in grads]
        else:
            p = _Inputs(hidden, weight, bias, scale, target)
            n = hidden.shape[0]
            if ctx.reduction == "none":
                coef = grad_out.to(p.acc).contiguous()
            else:
                coef = (grad_out.to(p.acc) * ctx.factor).expand(n).contiguous()
            grads = p.sweep(ctx.ignore_index, lse, coef, needs)[2:]
        out = []
        for tensor, dtype, need in zip(grads, ctx.dtypes, needs):
            out.append(None if (tensor is None or not need) else tensor.to(dtype))
        return (*out, None, None)


def linear_cross_entropy(hidden, weight, target, bias, scale, ignore_index, reduction):
    """Backend contract in _dispatch.py."""
    return LinearCrossEntropy.apply(hidden, weight, bias, scale, target, ignore_index, reduction)
