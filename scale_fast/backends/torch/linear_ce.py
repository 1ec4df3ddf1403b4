"""Chunked linear cross-entropy (docs/contract.md §7, linear_cross_entropy) in plain torch.

The [N, K] logits are formed a block of rows at a time.  For reductions "mean"
and "sum" the gradients are computed in the same pass as the loss (the
gradient of a scalar loss only waits for one number, grad_output), so every
tile is formed once: 3 GEMM passes in all.  For reduction "none" the per-row
grad_output is needed before dW can be summed, so backward recomputes the
tiles from the saved per-row log-sum-exp.
"""
from __future__ import annotations

import torch

from .scores import accumulation_dtype

# Elements of one [rows, K] logits block (float32: 16 MiB); the softmax works in place on it.
BLOCK_ELEMENTS = 1 << 22


def _row_blocks(n: int, k: int):
    rows = max(1, min(n, BLOCK_ELEMENTS // max(k, 1)))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


class _Problem:
    """The inputs of one call in the accumulation dtype, and the per-block pieces."""

    def __init__(self, hidden, weight, bias, scale, target, ignore_index):
        self.acc = accumulation_dtype(hidden.dtype)
        self.hidden = hidden
        self.weight = weight.to(self.acc)
        self.bias = None if bias is None else bias.to(self.acc)
        self.scale = None if scale is None else scale.to(self.acc)
        self.target = target
        self.soft = target.is_floating_point()
        self.ignore_index = ignore_index

    def logits(self, rows: slice, keep_raw: bool):
        """(h, raw, scaled) logits of a block; scaled is raw itself unless keep_raw and a scale."""
        h = self.hidden[rows].to(self.acc)
        raw = h @ self.weight.T if self.bias is None else torch.addmm(self.bias, h, self.weight.T)
        if self.scale is None:
            return h, raw, raw
        if keep_raw:
            return h, raw, raw * self.scale[rows, None]
        return h, raw, raw.mul_(self.scale[rows, None])

    def row_terms(self, rows: slice, logits: torch.Tensor):
        """(loss per row without lse, weight of lse per row) for the block."""
        if self.soft:
            q = self.target[rows].to(self.acc)
            return -(q * logits).sum(1), q.sum(1)
        t = self.target[rows]
        valid = t != self.ignore_index
        picked = logits.gather(1, torch.where(valid, t, torch.zeros_like(t))[:, None]).squeeze(1)
        return -picked * valid, valid.to(self.acc)

    def dlogits(self, rows: slice, prob: torch.Tensor, lse_weight: torch.Tensor):
        """d loss_n / d scaled_logits for the block, from its softmax `prob` (overwritten)."""
        prob.mul_(lse_weight[:, None])
        if self.soft:
            return prob.sub_(self.target[rows].to(self.acc))
        t = self.target[rows]
        valid = t != self.ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        prob.scatter_add_(1, safe[:, None], -valid.to(self.acc)[:, None])
        return prob


class _Grads:
    """Gradient buffers, filled block by block."""

    def __init__(self, problem: _Problem, needs):
        p = problem
        self.needs = needs  # hidden, weight, bias, scale, target
        n = p.hidden.shape[0]
        self.hidden = torch.zeros(p.hidden.shape, dtype=p.acc, device=p.hidden.device) if needs[0] else None
        self.weight = torch.zeros_like(p.weight) if needs[1] else None
        self.bias = torch.zeros(p.weight.shape[0], dtype=p.acc, device=p.weight.device) if needs[2] else None
        self.scale = torch.zeros(n, dtype=p.acc, device=p.hidden.device) if needs[3] else None
        self.target = torch.zeros(p.target.shape, dtype=p.acc, device=p.target.device) if needs[4] else None

    def add_block(self, p: _Problem, rows, h, raw, g_scaled, coef, lse, logits_for_target):
        """Accumulate a block's contributions given g_scaled = d loss_n / d scaled logits."""
        if self.scale is not None:
            self.scale[rows] = (g_scaled * raw).sum(1) * coef
        if self.target is not None:  # d(-sum_k q_k log_softmax_k) / dq = lse - logit
            self.target[rows] = (lse[:, None] - logits_for_target) * coef[:, None]
        g_raw = g_scaled if p.scale is None else g_scaled.mul_(p.scale[rows, None])
        g_raw.mul_(coef[:, None])
        if self.hidden is not None:
            self.hidden[rows] = g_raw @ p.weight
        if self.weight is not None:
            self.weight += g_raw.T @ h
        if self.bias is not None:
            self.bias += g_raw.sum(0)


def _softmax_(logits: torch.Tensor, lse: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """Turn a block of logits into exp(logits - max) (or its row softmax) in place; returns the rows' lse.

    In place, so a block costs one [rows, K] buffer; with a known lse the softmax is one exp pass.
    """
    if lse is not None:
        logits.sub_(lse[:, None]).exp_()
        return lse
    top = logits.amax(1, keepdim=True)
    total = logits.sub_(top).exp_().sum(1, keepdim=True)
    if normalize:
        logits.div_(total)
    return (top + total.log()).squeeze(1)


def _sweep(p: _Problem, grads: _Grads | None, coef: torch.Tensor, lse_saved: torch.Tensor | None):
    """One pass over the row blocks: per-row losses and lse, plus gradients when `grads`."""
    n = p.hidden.shape[0]
    losses = torch.zeros(n, dtype=p.acc, device=p.hidden.device)
    lse_all = torch.empty(n, dtype=p.acc, device=p.hidden.device)
    for rows in _row_blocks(n, p.weight.shape[0]):
        h, raw, logits = p.logits(rows, keep_raw=grads is not None and grads.scale is not None)
        partial, lse_weight = p.row_terms(rows, logits)
        # the target gradient needs the logits that the softmax overwrites
        for_target = logits.clone() if grads is not None and grads.target is not None else None
        lse = _softmax_(logits, None if lse_saved is None else lse_saved[rows], normalize=grads is not None)
        lse_all[rows] = lse
        losses[rows] = partial + lse * lse_weight
        if grads is not None:
            g = p.dlogits(rows, logits, lse_weight)
            grads.add_block(p, rows, h, raw, g, coef[rows], lse, for_target)
    return losses, lse_all


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, target, ignore_index, reduction):
        p = _Problem(hidden, weight, bias, scale, target, ignore_index)
        n = hidden.shape[0]
        if p.soft:
            count = torch.tensor(float(n), dtype=p.acc, device=hidden.device)
        else:
            count = (target != ignore_index).sum().to(p.acc)
        needs = ctx.needs_input_grad[:5]
        eager = reduction != "none" and any(needs)
        factor = (1.0 / count.clamp(min=1)) if reduction == "mean" else torch.ones((), dtype=p.acc, device=hidden.device)
        grads = _Grads(p, needs) if eager else None
        coef = factor.expand(n)
        losses, lse = _sweep(p, grads, coef, None)
        if reduction == "none":
            out = losses
        else:
            out = losses.sum() * factor
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if scale is None else scale.dtype, target.dtype)
        if not eager and any(needs):
            ctx.save_for_backward(hidden, weight, bias, scale, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is not None:  # computed in forward; grad_out is a scalar factor
            g, factor = ctx.grads, grad_out
        else:  # reduction "none": recompute the tiles with the per-row grad_out
            hidden, weight, bias, scale, target, lse = ctx.saved_tensors
            p = _Problem(hidden, weight, bias, scale, target, ctx.ignore_index)
            g, factor = _Grads(p, ctx.needs_input_grad[:5]), None
            _sweep(p, g, grad_out.to(p.acc), lse)
        out = []
        for tensor, dtype in zip((g.hidden, g.weight, g.bias, g.scale, g.target), ctx.dtypes):
            if tensor is not None and factor is not None:
                tensor = tensor * factor.to(tensor.dtype)
            out.append(None if tensor is None else tensor.to(dtype))
        return (*out, None, None)


def linear_cross_entropy(hidden, weight, target, bias, scale, ignore_index, reduction):
    """Backend contract in _dispatch.py."""
    return LinearCrossEntropy.apply(hidden, weight, bias, scale, target, ignore_index, reduction)
