"""Triton tile kernels of the sigmoid (SigLIP) pair loss (docs/contract.md §4, form="siglip").

The row-block contract of the shared all-pairs driver (scale_fast/backends/_allpairs.py):

``siglip_forward(q, k, rs, pos, bias)`` -> sum over the rows q [R, D] of
    sum_c softplus(-y_rc x_rc), x_rc = rs_r q_r . k_c + bias, y_rc = +1 where c == pos[r], else -1;
``siglip_backward(q, k, rs, pos, bias, coef)`` -> (dq, dk, d_rs, d_bias) of coef times that sum.

Nothing R x C is stored: the forward streams the column blocks of its row block and keeps a
per-row sum; the backward recomputes the tiles twice, once per row block (dq, d_rs, d_bias,
no atomics) and once per column block (dk, no atomics), d x_rc = sigmoid(x_rc) - [c == pos(r)],
-sigmoid(-x) on the positives (sigmoid(x) - 1 there would lose every digit the two share: the
scale's and the bias's gradients are sums of these terms).
The whole feature dimension is one BLOCK_D (next power of two of D): a row block of q and a
column block of k each load once per tile.  Accumulation is float32 (float64 for float64 input).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(D: int):
    block_d = max(16, triton.next_power_of_2(D))
    block = 16 if _INTERPRET else (64 if block_d <= 256 else 32)
    return block, block_d


@triton.jit
def _rows_kernel(Q, K, RS, POS, BIAS, LOSS, DQ, DRS, DBIAS, R, C, D, coef,
                 stride_q, stride_k, stride_dq,
                 BACKWARD: tl.constexpr, ACC64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc_t = tl.float64 if ACC64 else tl.float32
    rs = tl.load(RS + rows, mask=rmask, other=0.0).to(acc_t)
    pos = tl.load(POS + rows, mask=rmask, other=-1)
    bias = tl.load(BIAS).to(acc_t)
    loss = tl.zeros([BLOCK_M], dtype=acc_t)
    d_rs = tl.zeros([BLOCK_M], dtype=acc_t)
    d_bias = tl.zeros([BLOCK_M], dtype=acc_t)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < C
        k = tl.load(K + cols[:, None].to(tl.int64) * stride_k + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        g = tl.dot(q, tl.trans(k), out_dtype=acc_t, input_precision="ieee")
        x = g * rs[:, None] + bias
        positive = cols[None, :] == pos[:, None]
        valid = rmask[:, None] & cmask[None, :]
        if BACKWARD:
            p = tl.sigmoid(tl.where(positive, -x, x))
            p = tl.where(valid, tl.where(positive, -p, p), 0.0)
            d_bias += tl.sum(p, 1)
            d_rs += tl.sum(p * g, 1)
            dq += tl.dot((p * (coef * rs)[:, None]).to(k.dtype), k, out_dtype=acc_t, input_precision="ieee")
        else:
            y_x = tl.where(positive, -x, x)  # softplus(-y x) with y = +1 on the positive
            term = tl.maximum(y_x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            loss += tl.sum(tl.where(valid, term, 0.0), 1)
    if BACKWARD:
        tl.store(DQ + rows[:, None].to(tl.int64) * stride_dq + dd[None, :], dq, mask=rmask[:, None] & dmask[None, :])
        tl.store(DRS + rows, coef * d_rs, mask=rmask)
        tl.store(DBIAS + rows, coef * d_bias, mask=rmask)
    else:
        tl.store(LOSS + rows, loss, mask=rmask)


@triton.jit
def _cols_kernel(Q, K, RS, POS, BIAS, DK, R, C, D, coef, stride_q, stride_k, stride_dk,
                 ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    acc_t = tl.float64 if ACC64 else tl.float32
    k = tl.load(K + cols[:, None].to(tl.int64) * stride_k + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
    bias = tl.load(BIAS).to(acc_t)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_t)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < R
        q = tl.load(Q + rows[:, None].to(tl.int64) * stride_q + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        rs = tl.load(RS + rows, mask=rmask, other=0.0).to(acc_t)
        pos = tl.load(POS + rows, mask=rmask, other=-1)
        g = tl.dot(q, tl.trans(k), out_dtype=acc_t, input_precision="ieee")
        x = g * rs[:, None] + bias
        positive = cols[None, :] == pos[:, None]
        p = tl.sigmoid(tl.where(positive, -x, x))
        p = tl.where(positive, -p, p)  # sigmoid(x) - 1 = -sigmoid(-x) on the positives, as in _rows_kernel
        p = tl.where(rmask[:, None] & cmask[None, :], p * (coef * rs)[:, None], 0.0)
        dk += tl.dot(tl.trans(p.to(q.dtype)), q, out_dtype=acc_t, input_precision="ieee")
    tl.store(DK + cols[:, None].to(tl.int64) * stride_dk + dd[None, :], dk, mask=cmask[:, None] & dmask[None, :])


def _prepared(q, k, rs, pos, bias):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.contiguous(), k.contiguous(), rs.to(acc).contiguous(), pos.contiguous(),
            bias.detach().to(acc).reshape(1).contiguous(), acc)


def siglip_forward(q, k, rs, pos, bias):
    """The summed sigmoid loss of the rows q against every row of k (see the module docstring)."""
    q, k, rs, pos, bias, acc = _prepared(q, k, rs, pos, bias)
    R, D = q.shape
    C = k.shape[0]
    loss = torch.empty(R, dtype=acc, device=q.device)
    block, block_d = _blocks(D)
    _rows_kernel[(triton.cdiv(R, block),)](q, k, rs, pos, bias, loss, loss, loss, loss, R, C, D, 1.0,
                                           q.stride(0), k.stride(0), 0, BACKWARD=False, ACC64=acc == torch.float64,
                                           BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    return loss.sum()


def siglip_backward(q, k, rs, pos, bias, coef):
    """(dq, dk, d_rs, d_bias) of coef * siglip_forward(q, k, rs, pos, bias)."""
    q, k, rs, pos, bias, acc = _prepared(q, k, rs, pos, bias)
    R, D = q.shape
    C = k.shape[0]
    c = float(coef)
    dq = torch.empty(R, D, dtype=acc, device=q.device)
    dk = torch.empty(C, D, dtype=acc, device=q.device)
    d_rs = torch.empty(R, dtype=acc, device=q.device)
    d_bias = torch.empty(R, dtype=acc, device=q.device)
    block, block_d = _blocks(D)
    acc64 = acc == torch.float64
    _rows_kernel[(triton.cdiv(R, block),)](q, k, rs, pos, bias, d_rs, dq, d_rs, d_bias, R, C, D, c,
                                           q.stride(0), k.stride(0), dq.stride(0), BACKWARD=True, ACC64=acc64,
                                           BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    _cols_kernel[(triton.cdiv(C, block),)](q, k, rs, pos, bias, dk, R, C, D, c, q.stride(0), k.stride(0), dk.stride(0),
                                           ACC64=acc64, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    return dq, dk, d_rs, d_bias.sum()
