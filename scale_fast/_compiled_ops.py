"""Running a backend op: ``run_op`` calls the dispatcher's choice eagerly, and under torch.compile
the op's torch.library custom op, so that torch.compile sees each as one node.

Under torch.compile the backends' Python loops, host syncs and Triton launches
would break the graph; wrapped as custom ops with fake (shape-only)
implementations they compile with ``fullgraph=True``.  Their backward reruns
the op's forward with autograd enabled and differentiates it: one extra
forward pass, paid only under torch.compile (eager calls go straight to the
backend and keep their saved tensors).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._dispatch import get_op
from ._normalize import accumulation_dtype


_AUTOGRAD_KEYS = [torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView]


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """A custom op's implementation runs with autograd dispatch excluded; lift that for a recompute."""
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(_AUTOGRAD_KEYS, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _grads_by_recompute(run, inputs: Sequence[Optional[Tensor]], differentiable: Sequence[bool], grad_outputs):
    """Gradients of run(*inputs) w.r.t. the differentiable inputs (zeros where unused or None)."""
    with _autograd_inside_custom_op():
        leaves = [
            x.detach().requires_grad_(True) if (x is not None and diff) else x
            for x, diff in zip(inputs, differentiable)
        ]
        outputs = run(*leaves)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        wanted = [x for x, diff in zip(leaves, differentiable) if diff and x is not None]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) if pairs and wanted else [None] * len(wanted)
    result, it = [], iter(got)
    for x, diff in zip(inputs, differentiable):
        if not diff:
            continue
        if x is None:
            result.append(torch.empty(0))
            continue
        g = next(it)
        result.append(x.new_zeros(x.shape) if g is None else g.contiguous())
    return result


def _dense_like(x: Tensor) -> Tensor:
    """A contiguous tensor of x's shape (what the real implementations return)."""
    return x.new_empty(x.shape)


# --- contrastive -----------------------------------------------------------------------------

def _contrastive_run(backend, form, normalize):
    def run(z, present, logit_scale, row_weights):
        return get_op(backend, "contrastive", z)(z, present, logit_scale, row_weights, form, normalize=normalize)
    return run


@torch.library.custom_op("scale_fast::contrastive", mutates_args=())
def contrastive(z: Tensor, present: Tensor, logit_scale: Tensor, row_weights: Optional[Tensor], form: str,
                normalize: bool, backend: str) -> Tensor:
    with torch.no_grad():
        out = _contrastive_run(backend, form, normalize)(z, present, logit_scale, row_weights)
        return out.clone(memory_format=torch.contiguous_format)


@contrastive.register_fake
def _(z, present, logit_scale, row_weights, form, normalize, backend):
    return z.new_empty((z.shape[0], z.shape[0]), dtype=accumulation_dtype(z.dtype))


@torch.library.custom_op("scale_fast::contrastive_backward", mutates_args=())
def contrastive_backward(grad: Tensor, z: Tensor, present: Tensor, logit_scale: Tensor,
                         row_weights: Optional[Tensor], form: str, normalize: bool, backend: str) -> list[Tensor]:
    return _grads_by_recompute(_contrastive_run(backend, form, normalize), [z, present, logit_scale, row_weights],
                               [True, False, True, True], [grad])


@contrastive_backward.register_fake
def _(grad, z, present, logit_scale, row_weights, form, normalize, backend):
    return [_dense_like(z), _dense_like(logit_scale),
            torch.empty(0, device=z.device) if row_weights is None else _dense_like(row_weights)]


def _contrastive_setup(ctx, inputs, output):
    z, present, logit_scale, row_weights, form, normalize, backend = inputs
    ctx.save_for_backward(z, present, logit_scale, row_weights)
    ctx.options = (form, normalize, backend)
    ctx.has_weights = row_weights is not None


def _contrastive_grad(ctx, grad):
    z, present, logit_scale, row_weights = ctx.saved_tensors
    dz, dscale, dweights = contrastive_backward(grad, z, present, logit_scale, row_weights, *ctx.options)
    return dz, None, dscale, (dweights if ctx.has_weights else None), None, None, None


contrastive.register_autograd(_contrastive_grad, setup_context=_contrastive_setup)


# --- siglip (the sigmoid pair loss, form="siglip") ---------------------------------------------

def _siglip_run(backend, normalize):
    def run(z, present, logit_scale, logit_bias, row_weights):
        return get_op(backend, "siglip", z)(z, present, logit_scale, logit_bias, row_weights, normalize=normalize)
    return run


@torch.library.custom_op("scale_fast::siglip", mutates_args=())
def siglip(z: Tensor, present: Tensor, logit_scale: Tensor, logit_bias: Tensor, row_weights: Optional[Tensor],
           normalize: bool, backend: str) -> Tensor:
    with torch.no_grad():
        out = _siglip_run(backend, normalize)(z, present, logit_scale, logit_bias, row_weights)
        return out.clone(memory_format=torch.contiguous_format)


@siglip.register_fake
def _(z, present, logit_scale, logit_bias, row_weights, normalize, backend):
    return z.new_empty((z.shape[0], z.shape[0]), dtype=accumulation_dtype(z.dtype))


@torch.library.custom_op("scale_fast::siglip_backward", mutates_args=())
def siglip_backward(grad: Tensor, z: Tensor, present: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                    row_weights: Optional[Tensor], normalize: bool, backend: str) -> list[Tensor]:
    return _grads_by_recompute(_siglip_run(backend, normalize), [z, present, logit_scale, logit_bias, row_weights],
                               [True, False, True, True, True], [grad])


@siglip_backward.register_fake
def _(grad, z, present, logit_scale, logit_bias, row_weights, normalize, backend):
    return [_dense_like(z), _dense_like(logit_scale), _dense_like(logit_bias),
            torch.empty(0, device=z.device) if row_weights is None else _dense_like(row_weights)]


def _siglip_setup(ctx, inputs, output):
    z, present, logit_scale, logit_bias, row_weights, normalize, backend = inputs
    ctx.save_for_backward(z, present, logit_scale, logit_bias, row_weights)
    ctx.options = (normalize, backend)
    ctx.has_weights = row_weights is not None


def _siglip_grad(ctx, grad):
    z, present, logit_scale, logit_bias, row_weights = ctx.saved_tensors
    dz, dscale, dbias, dweights = siglip_backward(grad, z, present, logit_scale, logit_bias, row_weights, *ctx.options)
    return dz, None, dscale, dbias, (dweights if ctx.has_weights else None), None, None


siglip.register_autograd(_siglip_grad, setup_context=_siglip_setup)


# --- linear cross-entropy --------------------------------------------------------------------

def _lce_run(backend, ignore_index, reduction):
    def run(hidden, weight, target, bias, scale):
        return get_op(backend, "linear_cross_entropy", hidden, weight)(hidden, weight, target, bias, scale, ignore_index, reduction)
    return run


@torch.library.custom_op("scale_fast::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                         ignore_index: int, reduction: str, backend: str) -> Tensor:
    with torch.no_grad():
        return _lce_run(backend, ignore_index, reduction)(hidden, weight, target, bias, scale).clone(memory_format=torch.contiguous_format)


@linear_cross_entropy.register_fake
def _(hidden, weight, target, bias, scale, ignore_index, reduction, backend):
    shape = (hidden.shape[0],) if reduction == "none" else ()
    return hidden.new_empty(shape, dtype=accumulation_dtype(hidden.dtype))


@torch.library.custom_op("scale_fast::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                  scale: Optional[Tensor], ignore_index: int, reduction: str, backend: str) -> list[Tensor]:
    soft = target.is_floating_point()
    return _grads_by_recompute(_lce_run(backend, ignore_index, reduction), [hidden, weight, target, bias, scale],
                               [True, True, soft, True, True], [grad])


@linear_cross_entropy_backward.register_fake
def _(grad, hidden, weight, target, bias, scale, ignore_index, reduction, backend):
    out = [_dense_like(hidden), _dense_like(weight)]
    if target.is_floating_point():
        out.append(_dense_like(target))
    for x in (bias, scale):
        out.append(torch.empty(0, device=hidden.device) if x is None else _dense_like(x))
    return out


def _lce_setup(ctx, inputs, output):
    hidden, weight, target, bias, scale, ignore_index, reduction, backend = inputs
    ctx.save_for_backward(hidden, weight, target, bias, scale)
    ctx.options = (ignore_index, reduction, backend)
    ctx.present = (bias is not None, scale is not None, target.is_floating_point())


def _lce_grad(ctx, grad):
    hidden, weight, target, bias, scale = ctx.saved_tensors
    grads = list(linear_cross_entropy_backward(grad, hidden, weight, target, bias, scale, *ctx.options))
    has_bias, has_scale, soft = ctx.present
    dhidden, dweight = grads[0], grads[1]
    dtarget = grads[2] if soft else None
    dbias, dscale = grads[-2], grads[-1]
    return (dhidden, dweight, dtarget, dbias if has_bias else None, dscale if has_scale else None, None, None, None)


linear_cross_entropy.register_autograd(_lce_grad, setup_context=_lce_setup)


# --- info_nce (the "nce" masked task) ----------------------------------------------------------

def _nce_run(backend, scale):
    def run(a, b, row_weights):
        return get_op(backend, "info_nce", a, b)(a, b, row_weights, scale)
    return run


@torch.library.custom_op("scale_fast::info_nce", mutates_args=())
def info_nce(a: Tensor, b: Tensor, row_weights: Optional[Tensor], scale: float, backend: str) -> Tensor:
    with torch.no_grad():
        return _nce_run(backend, scale)(a, b, row_weights).clone(memory_format=torch.contiguous_format)


@info_nce.register_fake
def _(a, b, row_weights, scale, backend):
    return a.new_empty((), dtype=accumulation_dtype(a.dtype))


@torch.library.custom_op("scale_fast::info_nce_backward", mutates_args=())
def info_nce_backward(grad: Tensor, a: Tensor, b: Tensor, row_weights: Optional[Tensor], scale: float, backend: str) -> list[Tensor]:
    return _grads_by_recompute(_nce_run(backend, scale), [a, b, row_weights], [True, True, True], [grad])


@info_nce_backward.register_fake
def _(grad, a, b, row_weights, scale, backend):
    return [_dense_like(a), _dense_like(b),
            torch.empty(0, device=a.device) if row_weights is None else _dense_like(row_weights)]


def _nce_setup(ctx, inputs, output):
    a, b, row_weights, scale, backend = inputs
    ctx.save_for_backward(a, b, row_weights)
    ctx.options = (scale, backend)
    ctx.has_weights = row_weights is not None


def _nce_grad(ctx, grad):
    a, b, row_weights = ctx.saved_tensors
    da, db, dw = info_nce_backward(grad, a, b, row_weights, *ctx.options)
    return da, db, (dw if ctx.has_weights else None), None, None


info_nce.register_autograd(_nce_grad, setup_context=_nce_setup)


# --- scores ---------------------------------------------------------------------------------

def _scores_run(backend, mode, normalize):
    def run(z, present):
        return get_op(backend, "scores", z)(z, present, mode, normalize=normalize)
    return run


@torch.library.custom_op("scale_fast::scores", mutates_args=())
def scores(z: Tensor, present: Tensor, mode: str, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        out = _scores_run(backend, mode, normalize)(z, present)
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in out)


@scores.register_fake
def _(z, present, mode, normalize, backend):
    M, B = z.shape[0], z.shape[1]
    shape = (B, M, M) if mode == "sample" else (M, M)
    acc = accumulation_dtype(z.dtype)
    return z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc), z.new_empty((M, M), dtype=torch.bool)


@torch.library.custom_op("scale_fast::scores_backward", mutates_args=())
def scores_backward(grad_s: Tensor, grad_s_prime: Tensor, z: Tensor, present: Tensor, mode: str, normalize: bool,
                    backend: str) -> Tensor:
    (dz,) = _grads_by_recompute(_scores_run(backend, mode, normalize), [z, present], [True, False],
                                [grad_s, grad_s_prime, None])
    return dz


@scores_backward.register_fake
def _(grad_s, grad_s_prime, z, present, mode, normalize, backend):
    return _dense_like(z)


def _scores_setup(ctx, inputs, output):
    z, present, mode, normalize, backend = inputs
    ctx.save_for_backward(z, present)
    ctx.options = (mode, normalize, backend)


def _scores_grad(ctx, grad_s, grad_s_prime, grad_active):
    z, present = ctx.saved_tensors
    return scores_backward(grad_s, grad_s_prime, z, present, *ctx.options), None, None, None, None


scores.register_autograd(_scores_grad, setup_context=_scores_setup)


_CUSTOM_OPS = {"contrastive": contrastive, "siglip": siglip, "linear_cross_entropy": linear_cross_entropy,
               "info_nce": info_nce, "scores": scores}


def run_op(backend: str, name: str, *args, **options):
    """Run backend op `name` (a resolved backend, see scale_fast/_dispatch.py); under torch.compile
    through its custom op (one graph node).  options: the op's keyword options (normalize=)."""
    if torch.compiler.is_compiling() and name in _CUSTOM_OPS:
        return _CUSTOM_OPS[name](*args, *options.values(), backend)
    return get_op(backend, name, *args)(*args, **options)
