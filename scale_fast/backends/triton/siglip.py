"""Triton tile kernels of the sigmoid (SigLIP) pair loss (docs/contract.md §4, form="siglip").

The row-block contract of the shared all-pairs driver (scale_fast/backends/_allpairs.py):

``siglip_forward(q, k, rs, pos, bias)`` -> sum over the rows q [R, D] of
    sum_c softplus(-y_rc x_rc), x_rc = rs_r q_r . k_c + bias, y_rc = +1 where c == pos[r], else -1;
``siglip_backward(q, k, rs, pos, bias, coef)`` -> (dq, dk, d_rs, d_bias) of coef times that sum.

Forward: nothing R x C is stored; a program sweeps the column tiles of its row block, each Gram
tile summed over D in a software-pipelined loop from a fresh zero accumulator, and keeps a
per-row sum.  Backward: per chunk of rows (the buffer within SCALE_FAST_SIGLIP_BWD_MB, default
64 MiB, whatever R and C), a tile kernel writes E = coef rs_r (sigmoid(x_rc) - [c == pos(r)])
(-sigmoid(-x) on the positives) and per-tile row sums (no atomics); the GEMMs dq = E k and
dk += E^T q run in cuBLAS.  No program keeps a [rows, D] accumulator, so no register state grows with D.  Accumulation is
float32 (float64 for float64 input); E is kept in the input's dtype for 16-bit inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._allpairs import SigLIPKernels, all_pairs, pair_forms
from . import interpreted

_INTERPRET = interpreted()


def _config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of both kernels: tensor-core tiles for
    16-bit inputs, FMA tiles for exact fp32 and fp64 (checked for spills by benchmarks/kernel_report.py)."""
    if _INTERPRET:
        return 16, 16, 16, 4, 1
    if dtype in (torch.bfloat16, torch.float16):
        return 128, 64, 64, 8, 3
    if dtype == torch.float32:
        return 64, 64, 16, 4, 2
    return 32, 32, 16, 4, 1


@triton.jit
def _gram_tile(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
               STAGES: tl.constexpr, ACC64: tl.constexpr, DOT_F32: tl.constexpr):
    """q[rows] . k[cols] over D, one fresh accumulator, the D loop software-pipelined."""
    acc_t = tl.float64 if ACC64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        dd = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            qm, km = rmask[:, None], cmask[:, None]
        else:
            qm, km = rmask[:, None] & (dd < D)[None, :], cmask[:, None] & (dd < D)[None, :]
        q = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + dd[None, :], mask=qm, other=0.0)
        k = tl.load(K + cols[:, None].to(tl.int64) * stride_k + dd[None, :], mask=km, other=0.0)
        if DOT_F32:
            q, k = q.to(tl.float32), k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, out_dtype=acc_t, input_precision="ieee")
    return acc


@triton.jit
def _fwd_kernel(Q, K, RS, POS, BIAS, LOSS, R, C, D, stride_q, stride_k,
                ACC64: tl.constexpr, DOT_F32: tl.constexpr, EVEN_D: tl.constexpr, STAGES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    acc_t = tl.float64 if ACC64 else tl.float32
    rs = tl.load(RS + rows, mask=rmask, other=0.0).to(acc_t)
    pos = tl.load(POS + rows, mask=rmask, other=-1)
    bias = tl.load(BIAS).to(acc_t)
    loss = tl.zeros([BLOCK_M], dtype=acc_t)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < C
        g = _gram_tile(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                       BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, STAGES, ACC64, DOT_F32)
        x = g * rs[:, None] + bias
        y_x = tl.where(cols[None, :] == pos[:, None], -x, x)  # softplus(-y x) with y = +1 on the positive
        term = tl.maximum(y_x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        loss += tl.sum(tl.where(rmask[:, None] & cmask[None, :], term, 0.0), 1)
    tl.store(LOSS + rows, loss, mask=rmask)


@triton.jit
def _bwd_tile_kernel(Q, K, RS, POS, BIAS, E, PG, PS, R0, NR, C, D, coef, stride_q, stride_k, stride_e, stride_st,
                     ACC64: tl.constexpr, DOT_F32: tl.constexpr, EVEN_D: tl.constexpr, STAGES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (row tiles, column tiles) of rows R0 + [0, NR) against columns [0, C).  E[r, c] =
    # coef rs_r p_rc with p = sigmoid(x) - [c == pos(r)]; PG/PS[column tile, r] = sum_c p g, sum_c p.
    tm = tl.program_id(0)
    tn = tl.program_id(1)
    lrow = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = R0 + lrow
    rmask = lrow < NR
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    acc_t = tl.float64 if ACC64 else tl.float32
    rs = tl.load(RS + rows, mask=rmask, other=0.0).to(acc_t)
    pos = tl.load(POS + rows, mask=rmask, other=-1)
    bias = tl.load(BIAS).to(acc_t)
    g = _gram_tile(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                   BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, STAGES, ACC64, DOT_F32)
    x = g * rs[:, None] + bias
    positive = cols[None, :] == pos[:, None]
    # sigmoid(x) - 1 = -sigmoid(-x) on the positives: the difference would lose every digit the two
    # share, and the scale's and bias's gradients are sums of these terms
    p = tl.sigmoid(tl.where(positive, -x, x))
    p = tl.where(rmask[:, None] & cmask[None, :], tl.where(positive, -p, p), 0.0)
    st = tn.to(tl.int64) * stride_st + lrow
    tl.store(PG + st, tl.sum(p * g, 1), mask=rmask)
    tl.store(PS + st, tl.sum(p, 1), mask=rmask)
    e = p * (coef * rs)[:, None]
    dst = E + lrow.to(tl.int64)[:, None] * stride_e + cols[None, :]
    tl.store(dst, e.to(E.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _prepared(q, k, rs, pos, bias):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.contiguous(), k.contiguous(), rs.to(acc).contiguous(), pos.contiguous(),
            bias.detach().to(acc).reshape(1).contiguous(), acc)


def _flags(dtype: torch.dtype, D: int):
    """The kernels' constexprs and launch options at this input dtype and D."""
    bm, bn, bd, warps, stages = _config(dtype)
    # the interpreter's tl.dot multiplies bfloat16 operands as their raw bits: upcast there
    return dict(ACC64=dtype == torch.float64, DOT_F32=_INTERPRET and dtype == torch.bfloat16, EVEN_D=D % bd == 0,
                STAGES=stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def siglip_forward(q, k, rs, pos, bias):
    """The summed sigmoid loss of the rows q against every row of k (see the module docstring)."""
    q, k, rs, pos, bias, acc = _prepared(q, k, rs, pos, bias)
    R, D = q.shape
    C = k.shape[0]
    loss = torch.empty(R, dtype=acc, device=q.device)
    f = _flags(q.dtype, D)
    _fwd_kernel[(triton.cdiv(R, f["BLOCK_M"]),)](q, k, rs, pos, bias, loss, R, C, D, q.stride(0), k.stride(0), **f)
    return loss.sum()


def _chunk_rows(C: int, elem: int, unit: int) -> int:
    budget = float(os.environ.get("SCALE_FAST_SIGLIP_BWD_MB", "64")) * 2 ** 20
    return max(unit, int(budget // max(1, C * elem)) // unit * unit)


def siglip_backward(q, k, rs, pos, bias, coef):
    """(dq, dk, d_rs, d_bias) of coef * siglip_forward(q, k, rs, pos, bias)."""
    q, k, rs, pos, bias, acc = _prepared(q, k, rs, pos, bias)
    R, D = q.shape
    C = k.shape[0]
    c = float(coef)
    f = _flags(q.dtype, D)
    # E in the inputs' dtype for 16-bit inputs on a GPU (cuBLAS GEMMs at the tensor-core rate)
    e_dtype = q.dtype if (q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cuda") else acc
    qg, kg = (q, k) if e_dtype == q.dtype else (q.to(acc), k.to(acc))
    dq = torch.empty(R, D, dtype=acc, device=q.device)
    dk = torch.zeros(C, D, dtype=acc, device=q.device)
    d_rs = torch.empty(R, dtype=acc, device=q.device)
    d_bias = torch.zeros((), dtype=acc, device=q.device)
    if R == 0 or C == 0:
        dq.zero_()
        d_rs.zero_()
        return dq, dk, d_rs, d_bias
    ch = min(R, _chunk_rows(C, torch.finfo(e_dtype).bits // 8, f["BLOCK_M"]))
    n_ct = triton.cdiv(C, f["BLOCK_N"])
    e = torch.empty((ch, C), dtype=e_dtype, device=q.device)
    pg = torch.empty((n_ct, ch), dtype=acc, device=q.device)
    ps = torch.empty_like(pg)
    for r0 in range(0, R, ch):
        nr = min(ch, R - r0)
        _bwd_tile_kernel[(triton.cdiv(nr, f["BLOCK_M"]), n_ct)](
            q, k, rs, pos, bias, e, pg, ps, r0, nr, C, D, c, q.stride(0), k.stride(0), e.stride(0), pg.stride(0), **f)
        en = e[:nr]
        dq[r0:r0 + nr] = torch.mm(en, kg).to(acc)
        dk += torch.mm(en.t(), qg[r0:r0 + nr]).to(acc)
        d_rs[r0:r0 + nr] = c * pg[:, :nr].sum(0)
        d_bias += ps[:, :nr].sum()
    return dq, dk, d_rs, c * d_bias


def report_kernels(dtype: torch.dtype, D: int):
    """(name, kernel, constexprs and launch options) of every kernel launch at this dtype and D, for
    benchmarks/kernel_report.py."""
    f = _flags(dtype, D)
    return [("siglip_fwd", _fwd_kernel, f), ("siglip_bwd_tile", _bwd_tile_kernel, f)]


# the shared all-pairs driver over these kernels (it normalises the raw embeddings itself)
KERNELS = SigLIPKernels(siglip_forward, siglip_backward)
FORMS = pair_forms(KERNELS)


def siglip(e, present, logit_scale, logit_bias, row_weights, *, normalize=True):
    """[M, M] sigmoid (SigLIP) pair losses (backend contract in _dispatch.py)."""
    return all_pairs(FORMS, e, present, logit_scale, row_weights, "siglip", None, logit_bias, normalize)
