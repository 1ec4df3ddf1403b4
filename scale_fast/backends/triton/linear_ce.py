"""Fused linear cross-entropy on the GPU (the "triton" backend of ``linear_cross_entropy``).

``F.cross_entropy(scale[:, None] * (hidden @ weight.T + bias), target)`` (contract in
scale_fast/_dispatch.py, docs/contract.md §7) by the shared chunk loop of
scale_fast/backends/_lce_driver.py: per chunk of rows, cuBLAS forms the float32 logits
(``torch.mm(..., out_dtype=float32)`` on 16-bit inputs) into one reused buffer, ONE Triton
row kernel (``_lce_row_kernel``, below) turns them into losses and, in place, into the
gradient of the logits, and cuBLAS forms d hidden and accumulates d weight (float32 by
default).  Three GEMM passes for reductions "mean"/"sum" (the gradient is formed during the
forward; backward only multiplies by grad_output), four for "none".

The row kernel, one program per row:

* pass 1 (skipped when the log-sum-exp is given): the bias is added on the fly, the row
  max and sum of exponentials are kept online (one read of the row); hard targets read the
  target logit directly, soft targets accumulate sum_k q_k z_k and sum_k q_k;
* pass 2 (gradients wanted): G = (softmax * sum(q) - q) * s_n * c_n, written over the row.
  With 16-bit GEMM operands G goes, in the operand dtype, into the first half of the row's
  own float32 bytes: it only ever overwrites logits that every lane has already read (a
  barrier per tile orders the lanes), so no second buffer is needed.  d scale (one
  reduction per row) and d soft-target are formed in the same pass.
* a row whose target is ignore_index is skipped: loss 0, G 0 (the GEMMs then add nothing),
  decided on the device: no host synchronisation anywhere (counts and the mean's
  normaliser stay device tensors; chunk sizes depend on shapes only).

No atomics, no shared accumulators: each program writes its own row.  Chunks: Liger's
size (the power of two at or above N / ceil(K / H)), halved while the float32 logits
buffer exceeds ``SCALE_FAST_LCE_CHUNK_MB`` (default 48 MiB; read at every call).  Peak extra
memory at N=16384, K=21128, H=768, bf16: the 41 MiB buffer, d hidden 24 MiB and d weight
62 MiB in float32 (31 MiB with ``SCALE_FAST_LCE_WEIGHT_GRAD=input``), see the driver.
Float32 inputs: the GEMMs are exact float32 unless ``SCALE_FAST_TF32=1`` (read at every
call) allows TF32.  Under ``TRITON_INTERPRET=1`` (CPU tests) the kernel runs interpreted and
the GEMMs are torch's CPU ones on the same operands.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl

from .._lce_driver import Engine, LinearCrossEntropy, chunk_rows
from . import interpreted

__all__ = ["linear_cross_entropy"]

_INTERPRET = interpreted()
# Columns per tile and warps of the row kernel (the interpreter's tile is small so that the
# CPU tests cross several tiles).
BLOCK_K = 64 if _INTERPRET else 2048
NUM_WARPS = 8


@triton.jit
def _raw_tile(x_row, b_ptr, cols, mask, HAS_BIAS: tl.constexpr):
    """A tile of a row's raw logits (bias added); 0 outside the row."""
    raw = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        raw += tl.load(b_ptr + cols, mask=mask, other=0.0).to(raw.dtype)
    return raw


@triton.jit
def _lce_row_kernel(
    x_ptr, g_ptr, b_ptr, s_ptr, t_ptr, lse_in_ptr, c_ptr,
    loss_ptr, lse_ptr, ds_ptr, dt_ptr,
    K, ignore_index, stride_x, stride_g, stride_t, stride_tk, stride_dt,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SOFT: tl.constexpr, HAS_LSE: tl.constexpr,
    GRAD: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr, NARROW_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row `program_id` of a chunk: loss and lse (unless HAS_LSE), and with GRAD the gradient of
    the raw logits written to g (x itself, or with NARROW_G 16-bit half rows of x)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    acc_ty = x_ptr.dtype.element_ty
    sc = tl.load(s_ptr + row) if HAS_SCALE else 1.0
    if SOFT:
        keep = True
        t_row = t_ptr + row * stride_t
    else:
        t = tl.load(t_ptr + row)
        keep = t != ignore_index
    if keep:
        if HAS_LSE:
            lse = tl.load(lse_in_ptr + row)
            qs = tl.zeros([], dtype=acc_ty)
            if SOFT:  # sum_k q_k weights the softmax in the gradient
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + offs
                    q = tl.load(t_row + cols * stride_tk, mask=cols < K, other=0.0).to(acc_ty)
                    qs += tl.sum(q, axis=0)
        else:
            m = tl.full([], float("-inf"), dtype=acc_ty)
            s = tl.zeros([], dtype=acc_ty)
            qz = tl.zeros([], dtype=acc_ty)
            qs = tl.zeros([], dtype=acc_ty)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs
                mask = cols < K
                z = _raw_tile(x_row, b_ptr, cols, mask, HAS_BIAS) * sc
                zm = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(zm, axis=0))  # finite: every tile has a column
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
                m = m_new
                if SOFT:
                    q = tl.load(t_row + cols * stride_tk, mask=mask, other=0.0).to(acc_ty)
                    qz += tl.sum(q * z, axis=0)
                    qs += tl.sum(q, axis=0)
            lse = m + tl.log(s)
            if SOFT:
                loss = qs * lse - qz
            else:
                raw_t = tl.load(x_row + t)
                if HAS_BIAS:
                    raw_t += tl.load(b_ptr + t).to(acc_ty)
                loss = lse - raw_t * sc
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
        if GRAD:
            c = tl.load(c_ptr + row)
            f = sc * c
            ds = tl.zeros([BLOCK_K], dtype=acc_ty)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs
                mask = cols < K
                raw = _raw_tile(x_row, b_ptr, cols, mask, HAS_BIAS)
                z = raw * sc
                p = tl.exp(z - lse)
                if SOFT:
                    q = tl.load(t_row + cols * stride_tk, mask=mask, other=0.0).to(acc_ty)
                    gz = p * qs - q
                    if NEED_DT:
                        tl.store(dt_ptr + row * stride_dt + cols, (lse - z) * c, mask=mask)
                else:
                    gz = p - tl.where(cols == t, 1.0, 0.0)
                if NEED_DS:
                    ds += tl.where(mask, gz * raw, 0.0)
                if NARROW_G:  # G overwrites bytes of this tile and earlier: all lanes have read them
                    tl.debug_barrier()
                tl.store(g_row + cols, (gz * f).to(g_ptr.dtype.element_ty), mask=mask)
            if NEED_DS:
                tl.store(ds_ptr + row, tl.sum(ds, axis=0) * c)
    else:  # ignored row: no loss, no gradient
        if not HAS_LSE:
            tl.store(loss_ptr + row, tl.zeros([], dtype=acc_ty))
            tl.store(lse_ptr + row, tl.zeros([], dtype=acc_ty))
        if GRAD:
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_K], dtype=g_ptr.dtype.element_ty), mask=cols < K)
            if NEED_DS:
                tl.store(ds_ptr + row, tl.zeros([], dtype=acc_ty))


def row_pass(x, g, *, bias, scale, target, ignore_index, lse_in, coef, loss, lse, dscale, dtarget):
    """The driver's row pass (contract in _lce_driver.Engine): one launch of _lce_row_kernel."""
    r, k = x.shape
    if r == 0:
        return
    soft = target.is_floating_point()
    dummy = x  # never read: its flag is off
    _lce_row_kernel[(r,)](
        x, g if g is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, target, lse_in if lse_in is not None else dummy,
        coef if coef is not None else dummy,
        loss if loss is not None else dummy, lse if lse is not None else dummy,
        dscale if dscale is not None else dummy, dtarget if dtarget is not None else dummy,
        k, ignore_index, x.stride(0), g.stride(0) if g is not None else 0, target.stride(0) if soft else 0,
        target.stride(1) if soft else 0,
        dtarget.stride(0) if dtarget is not None else 0,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, SOFT=soft, HAS_LSE=lse_in is not None,
        GRAD=g is not None, NEED_DS=dscale is not None, NEED_DT=dtarget is not None,
        NARROW_G=g is not None and g.dtype != x.dtype, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )


# Fewest rows per chunk: d weight (fp32) is read and written once per chunk, 8 K H bytes against
# 2 R K H FLOPs, so short chunks leave the tensor cores waiting on HBM (at K=151936, H=768, 48 MiB
# would allow 64 rows: 1024 passes over 445 MiB).  512 is Liger's chunk at N=65536 there.
MIN_ROWS = 512


def _rows_per_chunk(n: int, k: int, h: int, device: torch.device) -> int:
    mb = float(os.environ.get("SCALE_FAST_LCE_CHUNK_MB", "48"))
    if not mb > 0:
        raise ValueError(f"SCALE_FAST_LCE_CHUNK_MB must be a positive number, got {mb!r}")
    return chunk_rows(n, k, h, mb * 2 ** 20, min_rows=MIN_ROWS)


@contextlib.contextmanager
def _cublas_precision():
    """Float32 GEMMs exact unless SCALE_FAST_TF32=1 (read at every call); restored after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = os.environ.get("SCALE_FAST_TF32", "0").strip() == "1"
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = prev


ENGINE = Engine(row_pass=row_pass, rows_per_chunk=_rows_per_chunk,
                operand_dtype=lambda dtype, device: dtype,  # 16-bit GEMMs, fp32 accumulation
                host_count=False, gemm_context=_cublas_precision)


def linear_cross_entropy(hidden, weight, target, bias=None, scale=None, ignore_index=-100, reduction="mean"):
    """Backend contract in ``scale_fast/_dispatch.py``."""
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dt), weight.to(dt)
    target = target if target.is_floating_point() else target.contiguous()
    return LinearCrossEntropy.apply(ENGINE, hidden, weight, bias, scale, target, int(ignore_index), reduction)
