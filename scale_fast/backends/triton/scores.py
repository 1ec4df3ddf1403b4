"""Triton kernels for the inter-modality scores S and matching scores S' (docs/contract.md §3).

``scores(z, present, mode) -> (S, S_prime, active)``

* ``mode="sample"``: one program per block of BLOCK_B samples loads their [M, D]
  rows (D in BLOCK_D chunks, absent rows masked to 0, so NaN there is harmless),
  forms each sample's M x M Gram with elementwise products and reductions (M is
  padded to a power of two >= 2; the tiles are far below tl.dot's 16 minimum),
  then the masked row softmax A, R = S * A and the row normalization, and stores
  S and S' [B, M, M].  The backward kernel recomputes A, R and the norms from the
  saved S, chains dS' -> dR -> (dS, dA) -> dS through the softmax, and writes
  dz[i, b] = sum_j (dG_ij + dG_ji) z[j, b] (0 for absent rows).
* ``mode="batch"``: a split-over-B kernel writes per-program partial M x M sums of
  z_i[b] . z_j[b] (absent rows are 0, so only b in P_ij count); the [M, M]
  mean, softmax, R and normalization are plain torch on [M, M].  Its backward
  reuses the sample backward kernel with one shared [M, M] dG (batch stride 0).
* float64 inputs and M > 16 have no kernels here: the backend's record (``__init__``) says so and
  the dispatcher runs the torch backend for them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._scores import harmonize

_EPS = 1e-12
_ELEMS = 4096  # BLOCK_B * MP * MP * BLOCK_D per step
_BLOCK_D = 16


def _blocks(M: int, B: int):
    MP = max(2, triton.next_power_of_2(M))
    bb = max(1, _ELEMS // (MP * MP * _BLOCK_D))
    bb = min(bb, max(1, triton.next_power_of_2(max(B, 1))))
    return MP, bb, _BLOCK_D


@triton.jit
def _load_tile(z_ptr, pres, ob, oi, d0, D, stride_zm, stride_zb, BLOCK_D: tl.constexpr):
    """[BLOCK_B, MP, BLOCK_D] fp32 chunk of z (0 where absent / out of range)."""
    od = tl.arange(0, BLOCK_D)
    ptrs = (z_ptr + oi.to(tl.int64)[None, :, None] * stride_zm
            + ob.to(tl.int64)[:, None, None] * stride_zb + (d0 + od)[None, None, :])
    mask = pres[:, :, None] & ((d0 + od) < D)[None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_present(pres_ptr, ob, oi, M, B, stride_pm):
    m = (oi[None, :] < M) & (ob[:, None] < B)
    v = tl.load(pres_ptr + oi.to(tl.int64)[None, :] * stride_pm + ob[:, None], mask=m, other=0)
    return m & (v != 0)


@triton.jit
def _gram(z_ptr, pres, ob, oi, D, stride_zm, stride_zb,
          BLOCK_B: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr):
    G = tl.zeros((BLOCK_B, MP, MP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        zt = _load_tile(z_ptr, pres, ob, oi, d0, D, stride_zm, stride_zb, BLOCK_D)
        G += tl.sum(zt[:, :, None, :] * zt[:, None, :, :], axis=3)
    return G


@triton.jit
def _harmonize(S, act):
    """A = masked row softmax of S, R = S * A, row norms (from the masked S)."""
    mx = tl.max(tl.where(act, S, float("-inf")), axis=2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.where(act, tl.exp(S - mx[:, :, None]), 0.0)
    den = tl.sum(e, axis=2)
    A = e / tl.where(den > 0, den, 1.0)[:, :, None]
    R = S * A
    nrm = tl.sqrt(tl.sum(R * R, axis=2))
    return A, R, nrm


@triton.jit
def _scores_sample_fwd_kernel(
    z_ptr, pres_ptr, s_ptr, sp_ptr,
    M, B, D, stride_zm, stride_zb, stride_pm,
    MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    ob = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    oi = tl.arange(0, MP)
    pres = _load_present(pres_ptr, ob, oi, M, B, stride_pm)
    G = _gram(z_ptr, pres, ob, oi, D, stride_zm, stride_zb, BLOCK_B, MP, BLOCK_D)
    act = pres[:, :, None] & pres[:, None, :]
    S = tl.where(act, G, 0.0)
    A, R, nrm = _harmonize(S, act)
    Sp = R / tl.maximum(nrm, 1e-12)[:, :, None]
    ob64 = ob.to(tl.int64)[:, None, None]
    offs = ob64 * M * M + oi[None, :, None] * M + oi[None, None, :]
    omask = (ob[:, None, None] < B) & (oi[None, :, None] < M) & (oi[None, None, :] < M)
    tl.store(s_ptr + offs, S, mask=omask)
    tl.store(sp_ptr + offs, Sp, mask=omask)


@triton.jit
def _scores_bwd_kernel(
    z_ptr, pres_ptr, s_ptr, ds_ptr, dsp_ptr, dg_ptr, dz_ptr,
    M, B, D, stride_zm, stride_zb, stride_pm, stride_dzm, stride_dzb, stride_gb,
    FROM_SCORES: tl.constexpr,
    MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    ob = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    oi = tl.arange(0, MP)
    pres = _load_present(pres_ptr, ob, oi, M, B, stride_pm)
    act = pres[:, :, None] & pres[:, None, :]
    ob64 = ob.to(tl.int64)[:, None, None]
    omask = (ob[:, None, None] < B) & (oi[None, :, None] < M) & (oi[None, None, :] < M)
    if FROM_SCORES:
        offs = ob64 * M * M + oi[None, :, None] * M + oi[None, None, :]
        S = tl.load(s_ptr + offs, mask=omask & act, other=0.0)
        dS = tl.load(ds_ptr + offs, mask=omask & act, other=0.0)
        dSp = tl.load(dsp_ptr + offs, mask=omask & act, other=0.0)
        A, R, nrm = _harmonize(S, act)
        nc = tl.maximum(nrm, 1e-12)
        big = nrm >= 1e-12
        dot = tl.sum(dSp * R, axis=2)
        k = tl.where(big, dot / (nc * nc * tl.where(nrm > 0, nrm, 1.0)), 0.0)
        dR = dSp / nc[:, :, None] - R * k[:, :, None]
        dA = dR * S
        dS = dS + dR * A + A * (dA - tl.sum(A * dA, axis=2)[:, :, None])
        dG = tl.where(act, dS, 0.0)
    else:
        offs = ob64 * stride_gb + oi[None, :, None] * MP + oi[None, None, :]
        dG = tl.load(dg_ptr + offs, mask=omask & act, other=0.0)
    od = tl.arange(0, BLOCK_D)
    dptrs = (dz_ptr + oi.to(tl.int64)[None, :, None] * stride_dzm
             + ob.to(tl.int64)[:, None, None] * stride_dzb + od[None, None, :])
    rmask = (ob[:, None] < B) & (oi[None, :] < M)
    for d0 in range(0, D, BLOCK_D):
        zt = _load_tile(z_ptr, pres, ob, oi, d0, D, stride_zm, stride_zb, BLOCK_D)
        dz = (tl.sum(dG[:, :, :, None] * zt[:, None, :, :], axis=2)
              + tl.sum(dG[:, :, :, None] * zt[:, :, None, :], axis=1))
        dz = tl.where(pres[:, :, None], dz, 0.0)
        tl.store(dptrs + d0, dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, :, None] & ((d0 + od) < D)[None, None, :])


@triton.jit
def _scores_batch_gram_kernel(
    z_ptr, pres_ptr, part_ptr,
    M, B, D, stride_zm, stride_zb, stride_pm,
    MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    ob = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    oi = tl.arange(0, MP)
    pres = _load_present(pres_ptr, ob, oi, M, B, stride_pm)
    G = _gram(z_ptr, pres, ob, oi, D, stride_zm, stride_zb, BLOCK_B, MP, BLOCK_D)
    Gs = tl.sum(G, axis=0)
    offs = pid.to(tl.int64) * MP * MP + oi[:, None] * MP + oi[None, :]
    tl.store(part_ptr + offs, Gs)


def _prep(z: torch.Tensor, present: torch.Tensor):
    if z.stride(-1) != 1:
        z = z.contiguous()
    present_u8 = present.to(torch.bool).contiguous().view(torch.uint8)
    return z, present_u8


def _run_bwd(z, present_u8, S, dS, dSp, dG, stride_gb, from_scores):
    M, B, D = z.shape
    MP, BB, BD = _blocks(M, B)
    dz = torch.empty((M, B, D), device=z.device, dtype=z.dtype)
    if B == 0 or D == 0:
        return dz.zero_()
    dummy = dz
    _scores_bwd_kernel[(triton.cdiv(B, BB),)](
        z, present_u8,
        S if S is not None else dummy, dS if dS is not None else dummy,
        dSp if dSp is not None else dummy, dG if dG is not None else dummy, dz,
        M, B, D, z.stride(0), z.stride(1), present_u8.stride(0), dz.stride(0), dz.stride(1), stride_gb,
        FROM_SCORES=from_scores, MP=MP, BLOCK_B=BB, BLOCK_D=BD,
    )
    return dz


class _SampleScoresFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, present_u8):
        M, B, D = z.shape
        MP, BB, BD = _blocks(M, B)
        S = torch.zeros((B, M, M), device=z.device, dtype=torch.float32)
        Sp = torch.zeros((B, M, M), device=z.device, dtype=torch.float32)
        if B > 0:
            _scores_sample_fwd_kernel[(triton.cdiv(B, BB),)](
                z, present_u8, S, Sp, M, B, D, z.stride(0), z.stride(1), present_u8.stride(0),
                MP=MP, BLOCK_B=BB, BLOCK_D=BD,
            )
        ctx.save_for_backward(z, present_u8, S)
        return S, Sp

    @staticmethod
    def backward(ctx, dS, dSp):
        z, present_u8, S = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        dS = torch.zeros_like(S) if dS is None else dS.to(torch.float32).contiguous()
        dSp = torch.zeros_like(S) if dSp is None else dSp.to(torch.float32).contiguous()
        dz = _run_bwd(z, present_u8, S, dS, dSp, None, 0, True)
        return dz, None


class _BatchGramFn(torch.autograd.Function):
    """Ssum[i, j] = sum_b present[i,b] present[j,b] z[i,b] . z[j,b]  ([M, M] fp32)."""

    @staticmethod
    def forward(ctx, z, present_u8):
        M, B, D = z.shape
        MP, BB, BD = _blocks(M, B)
        nprog = triton.cdiv(B, BB) if B > 0 else 0
        part = torch.zeros((max(nprog, 1), MP, MP), device=z.device, dtype=torch.float32)
        if nprog > 0:
            _scores_batch_gram_kernel[(nprog,)](
                z, present_u8, part, M, B, D, z.stride(0), z.stride(1), present_u8.stride(0),
                MP=MP, BLOCK_B=BB, BLOCK_D=BD,
            )
        ctx.save_for_backward(z, present_u8)
        return part.sum(0)[:M, :M].contiguous()

    @staticmethod
    def backward(ctx, dSsum):
        z, present_u8 = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        M = z.shape[0]
        MP, _, _ = _blocks(M, z.shape[1])
        dG = torch.zeros((MP, MP), device=z.device, dtype=torch.float32)
        dG[:M, :M] = dSsum.to(torch.float32)
        dz = _run_bwd(z, present_u8, None, None, None, dG, 0, False)
        return dz, None


def scores(z, present, mode="sample"):
    """(S, S_prime, active) of docs/contract.md §3 for z [M, B, D] (L2-normalised, absent rows 0)."""
    if mode not in ("sample", "batch"):
        raise ValueError(f"mode must be 'sample' or 'batch', got {mode!r}")
    present = present.to(torch.bool)
    active = (present[:, None, :] & present[None, :, :]).any(-1)
    z, present_u8 = _prep(z, present)
    if mode == "sample":
        S, Sp = _SampleScoresFn.apply(z, present_u8)
        return S, Sp, active
    Ssum = _BatchGramFn.apply(z, present_u8)
    cnt = (present[:, None, :] & present[None, :, :]).sum(-1).to(torch.float32)
    S = torch.where(active, Ssum / cnt.clamp_min(1), torch.zeros_like(Ssum))
    return S, harmonize(S, active), active
