"""Triton kernels for the SCALE pair contrastive losses (docs/contract.md §4) and one-direction InfoNCE.

``contrastive(z, present, logit_scale, row_weights, form)`` -> [M, M] pair losses
``info_nce(a, b, row_weights, scale)`` -> 0-dim loss (one direction of "clip")

Design (all pairs i < j of one call run in the same launches; nothing B x B is stored):

* A pair's rows live on two *sides*: side 0 = z[i, :], side 1 = z[j, :], over the
  full batch B.  Sample b is a row of the pair when present[i, b] and present[j, b];
  other samples are masked out as rows and as columns (no compaction, no host sync).
* The logits of every form are s * w_row * G where G is a Gram tile between two
  sides.  The unique Gram blocks of a pair are *segments*:
    seg 0: side 0 x side 1, full square of tiles  -- "clip", "ntxent", "nce"
    seg 1: side 0 x side 0 and side 1 x side 1, upper triangles of tiles (the
           Gram is symmetric)                    -- "ntxent" only
  A tile gives its rows' LSE contributions (row weights) and, the Gram being
  symmetric, its columns' LSE contributions (column weights) too.  So "clip"
  computes each dot product once for both directions, and "ntxent" computes half
  of the 2n x 2n Gram instead of all of it.  Self-similarities (diagonal of seg 1's
  diagonal tiles) are masked; the positive of row b on either side is the diagonal
  of seg 0's diagonal tiles.
* Forward (one GEMM pass over the unique Gram entries, i.e. over B x B x D once for
  "clip" and twice for "ntxent"): grid (R, pairs, segments).  A program owns the
  row blocks g, g+R, ... (of both triangles for seg 1, which balances the work of
  the two kinds of program) and sweeps the column blocks FlashAttention-style;
  row LSEs accumulate online in registers, column LSEs are merged into the
  program's own slot of a partial buffer [pairs, segments, R, 2, B] (log-sum-exp
  merge, read-modify-write behind a CTA barrier, no atomics).  R is about 2
  programs per SM over all pairs, so the extra memory is O(SMs * B), independent
  of B^2.  The slots are combined afterwards in torch (O(pairs * R * B)).  The
  positive logits are written by the same pass.
* Backward (3 GEMMs per unique tile: recompute G = Z_row Z_col^T, then
  dZ_row += dG @ Z_col and dZ_col += dG^T @ Z_row): grid (tiles, pairs, segments),
  one tile per program, grouped row blocks for L2 reuse.  Both dZ sides go to an
  fp32 [M, B, D] buffer with fp32 atomics (a z row is shared by several pairs and
  D is looped in BLOCK_D chunks, so neither side can stay in registers).
  Row-weight gradients use fp32 atomics on [pairs, B]; the logit-scale gradient
  one fp32 atomic per program.  dG is divided by coef * s (so it is O(1)) before
  the low-precision GEMMs and the result is rescaled in fp32.
  Per pair, "clip" thus costs 4 B x B x D GEMM passes in all (1 forward,
  3 backward) for both directions; "ntxent", whose 2n x 2n Gram is 4 B x B blocks
  of which symmetry leaves 2 unique, costs 2 forward + 6 backward.
* All LSEs are kept in base 2 (exp2/log2); the loss is converted with ln 2.
* Offsets that involve B or D are computed in int64.

Precision: bf16/fp16 inputs use tensor cores with fp32 accumulation.  float32 inputs
use exact fp32 dot products (``input_precision="ieee"``) unless TF32 is enabled by the
environment variable ``SCALE_FAST_TF32=1`` (read at import) or by setting the module
attribute ``scale_fast.backends.triton.contrastive.ALLOW_TF32 = True``.  float64 inputs have no
kernels: the dispatcher runs the torch backend for them (the backend's record, ``__init__``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ALLOW_TF32 = os.environ.get("SCALE_FAST_TF32", "0") == "1"

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FORMS = ("ntxent", "clip")


# ----------------------------------------------------------------------------------
# autotune configurations
# ----------------------------------------------------------------------------------
# (BLOCK, BLOCK_D, num_warps, num_stages).  Tensor-core dots (bf16/fp16, TF32) and the
# exact fp32 dots (FMA units, far more registers per tile) get separate sets.
_TC_CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
               (64, 32, 4, 2))
_FMA_CONFIGS = ((64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2))


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    out = []
    for fma, table in ((False, _TC_CONFIGS), (True, _FMA_CONFIGS)):
        for block, block_d, warps, stages in table:
            cfg = triton.Config({"BLOCK": block, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)
            cfg.scale_fast_fma = fma
            out.append(cfg)
    return out


_MIN_BLOCK = min(c.kwargs["BLOCK"] for c in _configs())


def _prune_configs(configs, named_args, **kwargs):
    """Exact fp32 dots run on FMA units and need small tiles; tensor-core dots big ones."""
    if len(configs) <= 1:
        return configs
    z = named_args.get("z_ptr")
    prec = kwargs.get("PRECISION", named_args.get("PRECISION"))
    fma = getattr(z, "dtype", None) == torch.float32 and prec == "ieee"
    keep = [c for c in configs if getattr(c, "scale_fast_fma", False) == fma]
    return keep or configs


# ----------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------
@triton.jit
def _lse2_merge(a, b):
    """log2(2^a + 2^b), exact for -inf inputs (both -inf -> -inf)."""
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log2(tl.exp2(a - mx_safe) + tl.exp2(b - mx_safe))


@triton.jit
def _row_info(pres_ptr, w_ptr, mi, mj, p, offs, B, stride_pm, HAS_W: tl.constexpr):
    """(in-range mask, pair-row mask, row weight, additive mask bias) of samples `offs`.

    The weight is 0 and the bias -inf where the sample is not a row of pair p.
    """
    inr = offs < B
    pi = tl.load(pres_ptr + mi.to(tl.int64) * stride_pm + offs, mask=inr, other=0)
    pj = tl.load(pres_ptr + mj.to(tl.int64) * stride_pm + offs, mask=inr, other=0)
    ok = inr & (pi != 0) & (pj != 0)
    if HAS_W:
        w = tl.load(w_ptr + p.to(tl.int64) * B + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(ok, 1.0, 0.0)
    bias = tl.where(ok, 0.0, float("-inf"))
    return inr, ok, w, bias


@triton.jit
def _load_rows(base, offs64, ok, d0, D, stride_zb,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = base + offs64[:, None] * stride_zb + offs_d[None, :]
    if EVEN_D:
        v = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        v = tl.load(ptrs, mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if DOT_F32:
        v = v.to(tl.float32)
    return v


@triton.jit
def _gram_tile(xbase, ybase, rows64, cols64, r_ok, c_ok, D, stride_zb,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_F32: tl.constexpr):
    """G[r, c] = z_x[rows[r]] . z_y[cols[c]] in fp32 (rows not in the pair load as 0)."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_rows(xbase, rows64, r_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
        y = _load_rows(ybase, cols64, c_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


# ----------------------------------------------------------------------------------
# forward: per-row log-sum-exp partials and the positive logits
# ----------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["D", "NSEG", "HAS_W"], restore_value=["part_ptr"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _contrastive_fwd_kernel(
    z_ptr, pres_ptr, w_ptr, pi_ptr, pj_ptr, scale_ptr,
    part_ptr, pos2_ptr,
    B, D, stride_zm, stride_zb, stride_pm, RCAP,
    HAS_W: tl.constexpr, BOTH_DIR: tl.constexpr, NSEG: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # program (g, p, seg): seg 0 = side 0 x side 1 (full square);
    # seg 1 = side 0 x side 0 then side 1 x side 1 (upper triangles), so that both
    # kinds of program sweep about the same number of tiles.
    # Masks are additive -inf biases on 1-D row/column vectors (no 2-D boolean tiles);
    # rows that are not in the pair give garbage that the host masks out.
    g = tl.program_id(0)
    R = tl.num_programs(0)
    p = tl.program_id(1)
    seg = tl.program_id(2)
    mi = tl.load(pi_ptr + p)
    mj = tl.load(pj_ptr + p)
    tri = seg > 0
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    slot = ((p.to(tl.int64) * NSEG + seg) * RCAP + g) * 2
    NRB = tl.cdiv(B, BLOCK)
    ar = tl.arange(0, BLOCK)
    nh = tl.where(tri, 2, 1)
    for h in range(0, nh):
        xm = tl.where(tri & (h == 1), mj, mi)
        ym = tl.where(tri, xm, mj)
        xside = tl.where(tri, h, 0).to(tl.int64)
        yside = tl.where(tri, h, 1).to(tl.int64)
        xbase = z_ptr + xm.to(tl.int64) * stride_zm
        ybase = z_ptr + ym.to(tl.int64) * stride_zm
        xpart = part_ptr + (slot + xside) * B
        ypart = part_ptr + (slot + yside) * B
        for rb in range(g, NRB, R):
            rows = rb * BLOCK + ar
            r_in, r_ok, wr, rbias = _row_info(pres_ptr, w_ptr, mi, mj, p, rows, B, stride_pm, HAS_W)
            rows64 = rows.to(tl.int64)
            mult_r = s2 * wr
            m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK,), dtype=tl.float32)
            cb0 = tl.where(tri, rb, 0)
            for cb in range(cb0, NRB):
                cols = cb * BLOCK + ar
                c_in, c_ok, wc, cbias = _row_info(pres_ptr, w_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
                cols64 = cols.to(tl.int64)
                G = _gram_tile(xbase, ybase, rows64, cols64, r_ok, c_ok, D, stride_zb,
                               BLOCK, BLOCK_D, PRECISION, EVEN_D, DOT_F32)
                # row direction (online log-sum-exp, base 2)
                qk = G * mult_r[:, None] + cbias[None, :]
                if tri & (cb == rb):  # a triangle's diagonal tile: drop self-similarities
                    qk = tl.where(rows[:, None] == cols[None, :], float("-inf"), qk)
                if (seg == 0) & (cb == rb):  # positives: diagonal of seg 0's diagonal tiles
                    pos2 = tl.sum(tl.where(rows[:, None] == cols[None, :], qk, 0.0), 1)
                    tl.store(pos2_ptr + p.to(tl.int64) * B + rows64, pos2, mask=r_ok)
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
                m_i = m_new
                if BOTH_DIR:
                    # column direction: tile (rb, cb) holds the column rows' logits too,
                    # except on a triangle's diagonal tile (already counted as rows)
                    if (seg == 0) | (cb != rb):
                        qc = G * (s2 * wc)[None, :] + rbias[:, None]
                        mc = tl.max(qc, 0)
                        mc_safe = tl.where(mc == float("-inf"), 0.0, mc)
                        lse_c = mc_safe + tl.log2(tl.sum(tl.exp2(qc - mc_safe[None, :]), 0))
                        old = tl.load(ypart + cols64, mask=c_in, other=float("-inf"))
                        tl.store(ypart + cols64, _lse2_merge(old, lse_c), mask=c_in)
                        tl.debug_barrier()
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            lse_r = m_safe + tl.log2(l_i)
            old = tl.load(xpart + rows64, mask=r_in, other=float("-inf"))
            tl.store(xpart + rows64, _lse2_merge(old, lse_r), mask=r_in)
            tl.debug_barrier()


# ----------------------------------------------------------------------------------
# backward: one tile per program, recompute G once, both dZ sides by atomics
# ----------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["D", "NSEG", "HAS_W"],
                 reset_to_zero=["dz_ptr", "dw_ptr", "ds_ptr"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _contrastive_bwd_kernel(
    z_ptr, pres_ptr, w_ptr, pi_ptr, pj_ptr, scale_ptr, coef_ptr, lse_ptr,
    dz_ptr, dw_ptr, ds_ptr,
    B, D, stride_zm, stride_zb, stride_pm, stride_dzm, stride_dzb,
    HAS_W: tl.constexpr, BOTH_DIR: tl.constexpr, NSEG: tl.constexpr, NPOS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr, GROUP: tl.constexpr = 8,
):
    # grid (NRB * (NRB + 1), pairs, NSEG).  seg 0: tile (rb, cb) of side 0 x side 1,
    # grouped GROUP row blocks at a time for L2 reuse (t >= NRB^2 idle).  seg 1: the
    # NRB x (NRB + 1) rectangle packs both upper triangles: c >= r -> side 0 tile
    # (r, c); c < r -> side 1 tile (c, r - 1).
    t = tl.program_id(0)
    p = tl.program_id(1)
    seg = tl.program_id(2)
    NRB = tl.cdiv(B, BLOCK)
    tri = seg > 0
    in_group = GROUP * NRB
    first = (t // in_group) * GROUP
    gsize = tl.minimum(NRB - first, GROUP)
    rb0 = first + (t % in_group) % gsize
    cb0 = (t % in_group) // gsize
    r1 = t // NRB
    c1 = t % NRB
    h = (c1 < r1).to(tl.int32)
    rb = tl.where(tri, tl.where(h == 1, c1, r1), rb0)
    cb = tl.where(tri, tl.where(h == 1, r1 - 1, c1), cb0)
    work = tri | (t < NRB * NRB)
    coef = tl.load(coef_ptr + p).to(tl.float32)
    if work & (coef != 0.0):
        mi = tl.load(pi_ptr + p)
        mj = tl.load(pj_ptr + p)
        xm = tl.where(tri & (h == 1), mj, mi)
        ym = tl.where(tri, xm, mj)
        xside = tl.where(tri, h, 0).to(tl.int64)
        yside = tl.where(tri, h, 1).to(tl.int64)
        s = tl.load(scale_ptr).to(tl.float32)
        s2 = s * 1.4426950408889634
        xbase = z_ptr + xm.to(tl.int64) * stride_zm
        ybase = z_ptr + ym.to(tl.int64) * stride_zm
        ar = tl.arange(0, BLOCK)
        rows = rb * BLOCK + ar
        cols = cb * BLOCK + ar
        r_in, r_ok, wr, rbias = _row_info(pres_ptr, w_ptr, mi, mj, p, rows, B, stride_pm, HAS_W)
        c_in, c_ok, wc, cbias = _row_info(pres_ptr, w_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        pbase = lse_ptr + p.to(tl.int64) * 2 * B
        # +inf LSE for rows outside the pair: their probabilities are exactly 0
        lse_r = tl.load(pbase + xside * B + rows64, mask=r_ok, other=float("inf"))
        G = _gram_tile(xbase, ybase, rows64, cols64, r_ok, c_ok, D, stride_zb,
                       BLOCK, BLOCK_D, PRECISION, EVEN_D, DOT_F32)
        # dG / (coef * s): row-direction softmax, column-direction softmax, positives
        pr = tl.exp2(G * (s2 * wr)[:, None] - lse_r[:, None] + cbias[None, :])
        if tri & (cb == rb):
            pr = tl.where(rows[:, None] == cols[None, :], 0.0, pr)
        dw_r = tl.sum(pr * G, 1)
        dg = wr[:, None] * pr
        dw_c = tl.zeros((BLOCK,), dtype=tl.float32)
        if BOTH_DIR:
            if (seg == 0) | (cb != rb):
                lse_c = tl.load(pbase + yside * B + cols64, mask=c_ok, other=float("inf"))
                pc = tl.exp2(G * (s2 * wc)[None, :] - lse_c[None, :] + rbias[:, None])
                dw_c = tl.sum(pc * G, 0)
                dg += wc[None, :] * pc
        if (seg == 0) & (cb == rb):
            same = rows[:, None] == cols[None, :]
            dw_r -= NPOS * tl.sum(tl.where(same, G, 0.0), 1)
            dg = tl.where(same, dg - NPOS * wr[:, None], dg)
        cs = coef * s
        tl.atomic_add(ds_ptr + p, coef * tl.sum(tl.sum(dg * G, 1), 0))
        tl.atomic_add(dw_ptr + p.to(tl.int64) * B + rows64, cs * dw_r, mask=r_ok)
        if BOTH_DIR:
            tl.atomic_add(dw_ptr + p.to(tl.int64) * B + cols64, cs * dw_c, mask=c_ok)
        dgc = dg.to(z_ptr.dtype.element_ty)
        if DOT_F32:
            dgc = dgc.to(tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        dxp = dz_ptr + xm.to(tl.int64) * stride_dzm + rows64[:, None] * stride_dzb + offs_d[None, :]
        dyp = dz_ptr + ym.to(tl.int64) * stride_dzm + cols64[:, None] * stride_dzb + offs_d[None, :]
        for d0 in range(0, D, BLOCK_D):
            x = _load_rows(xbase, rows64, r_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
            y = _load_rows(ybase, cols64, c_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
            dx = tl.dot(dgc, y, input_precision=PRECISION) * cs
            dy = tl.dot(tl.trans(dgc), x, input_precision=PRECISION) * cs
            if EVEN_D:
                tl.atomic_add(dxp + d0, dx, mask=r_ok[:, None])
                tl.atomic_add(dyp + d0, dy, mask=c_ok[:, None])
            else:
                dm = (d0 + offs_d) < D
                tl.atomic_add(dxp + d0, dx, mask=r_ok[:, None] & dm[None, :])
                tl.atomic_add(dyp + d0, dy, mask=c_ok[:, None] & dm[None, :])


# ----------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------
_PAIR_CACHE: dict = {}


def _pairs(M: int, device: torch.device):
    key = (M, str(device))
    if key not in _PAIR_CACHE:
        iu = torch.triu_indices(M, M, 1)
        _PAIR_CACHE[key] = (iu[0].to(device=device, dtype=torch.int32),
                            iu[1].to(device=device, dtype=torch.int32),
                            iu[0].to(device), iu[1].to(device))
    return _PAIR_CACHE[key]


def _num_slots(B: int, npairs: int, nseg: int, device: torch.device) -> int:
    """R: programs per (pair, segment) in the forward; bounds the partial buffer."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2
    want = max(1, -(-2 * sms // (npairs * nseg)))
    return max(1, min(want, -(-B // _MIN_BLOCK)))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if ALLOW_TF32 else "ieee"
    return "ieee"


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits:
    # upcast there (after the same rounding); compiled kernels use bf16 tensor cores.
    return _INTERPRET and dtype == torch.bfloat16


def _lse2_combine(part: torch.Tensor) -> torch.Tensor:
    """[P, S, R, 2, B] base-2 partial LSEs -> [P, 2, B] (exact for a single finite term)."""
    P, S, R, two, B = part.shape
    flat = part.permute(0, 3, 4, 1, 2).reshape(P, two, B, S * R)
    mx = flat.amax(dim=-1)
    mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    return mx_safe + torch.log2(torch.exp2(flat - mx_safe[..., None]).sum(-1))


class _PairLossFn(torch.autograd.Function):
    """Per-pair losses [P] of pairs (pi[p], pj[p]); z [M, B, D]; w [P, B] or None."""

    @staticmethod
    def forward(ctx, z, w, scale, present_u8, pi32, pj32, valid, both_dir, nseg):
        M, B, D = z.shape
        P = pi32.numel()
        dev = z.device
        R = _num_slots(B, P, nseg, dev)
        part = torch.full((P, nseg, R, 2, B), float("-inf"), device=dev, dtype=torch.float32)
        pos2 = torch.zeros((P, B), device=dev, dtype=torch.float32)
        scale32 = scale.detach().reshape(()).to(device=dev, dtype=torch.float32)
        has_w = w is not None
        w_arg = w.detach() if has_w else pos2
        if B > 0 and P > 0:
            grid = lambda meta: (min(triton.cdiv(B, meta["BLOCK"]), R), P, nseg)  # noqa: E731
            _contrastive_fwd_kernel[grid](
                z, present_u8, w_arg, pi32, pj32, scale32, part, pos2,
                B, D, z.stride(0), z.stride(1), present_u8.stride(0), R,
                HAS_W=has_w, BOTH_DIR=both_dir, NSEG=nseg, PRECISION=_precision(z.dtype),
                DOT_F32=_dot_f32(z.dtype),
            )
        lse2 = _lse2_combine(part)  # [P, 2, B]
        del part
        n = valid.sum(1)
        per_row = lse2[:, 0, :] - pos2
        if both_dir:
            per_row = per_row + (lse2[:, 1, :] - pos2)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        denom = (2 * n if both_dir else n).to(torch.float32)
        loss = torch.where(n > 0, per_row.sum(1) * _LN2 / denom.clamp_min(1), torch.zeros_like(denom))
        ctx.save_for_backward(z, w if has_w else None, scale32, present_u8, pi32, pj32, valid, lse2)
        ctx.meta = (both_dir, nseg, has_w, scale.dtype, scale.shape, scale.device)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z, w, scale32, present_u8, pi32, pj32, valid, lse2 = ctx.saved_tensors
        both_dir, nseg, has_w, scale_dtype, scale_shape, scale_device = ctx.meta
        M, B, D = z.shape
        P = pi32.numel()
        n = valid.sum(1)
        denom = (2 * n if both_dir else n).to(torch.float32)
        coef = torch.where(n > 0, grad_loss.to(torch.float32) / denom.clamp_min(1),
                           torch.zeros_like(denom)).contiguous()
        dz = torch.zeros((M, B, D), device=z.device, dtype=torch.float32)
        dw = torch.zeros((P, B), device=z.device, dtype=torch.float32)
        ds = torch.zeros((P,), device=z.device, dtype=torch.float32)
        w_arg = w if has_w else dw
        if B > 0 and P > 0:
            grid = lambda meta: (triton.cdiv(B, meta["BLOCK"]) * (triton.cdiv(B, meta["BLOCK"]) + 1),  # noqa: E731
                                 P, nseg)
            _contrastive_bwd_kernel[grid](
                z, present_u8, w_arg, pi32, pj32, scale32, coef, lse2.contiguous(),
                dz, dw, ds,
                B, D, z.stride(0), z.stride(1), present_u8.stride(0), dz.stride(0), dz.stride(1),
                HAS_W=has_w, BOTH_DIR=both_dir, NSEG=nseg, NPOS=2 if both_dir else 1,
                PRECISION=_precision(z.dtype), DOT_F32=_dot_f32(z.dtype),
            )
        gz = dz.to(z.dtype) if ctx.needs_input_grad[0] else None
        gw = dw if (has_w and ctx.needs_input_grad[1]) else None
        gs = None
        if ctx.needs_input_grad[2]:
            gs = ds.sum().to(device=scale_device, dtype=scale_dtype).reshape(scale_shape)
        return gz, gw, gs, None, None, None, None, None, None


def _as_scale(logit_scale, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), device=ref.device, dtype=torch.float32)


def _prep_z(z: torch.Tensor) -> torch.Tensor:
    if z.stride(-1) != 1:
        z = z.contiguous()
    return z


def contrastive(z, present, logit_scale, row_weights, form):
    """[M, M] pair losses of docs/contract.md §4 (upper triangle, exactly 0 elsewhere)."""
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    M, B, D = z.shape
    scale = _as_scale(logit_scale, z)
    out = torch.zeros((M, M), device=z.device, dtype=torch.float32)
    if M < 2:
        return out
    z = _prep_z(z)
    pi32, pj32, pi, pj = _pairs(M, z.device)
    present = present.to(torch.bool)
    valid = present[pi] & present[pj]  # [P, B]
    present_u8 = present.contiguous().view(torch.uint8)
    w = None
    if row_weights is not None:
        w = row_weights[:, pi, pj].t().to(torch.float32).contiguous()  # [P, B], differentiable
    both, nseg = (True, 2) if form == "ntxent" else (True, 1)
    loss = _PairLossFn.apply(z, w, scale, present_u8, pi32, pj32, valid, both, nseg)
    return out.index_put((pi, pj), loss)


def info_nce(a, b, row_weights, scale):
    """mean_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_n), one direction (the "nce" task)."""
    N, F = a.shape
    s = _as_scale(scale, a)
    if N == 0:
        return (a.sum() + b.sum()).to(torch.float32) * 0.0
    dtype = torch.promote_types(a.dtype, b.dtype)
    z = torch.stack([a.to(dtype), b.to(dtype)], 0)
    pi32, pj32, pi, pj = _pairs(2, a.device)
    present = torch.ones((2, N), device=a.device, dtype=torch.bool)
    valid = torch.ones((1, N), device=a.device, dtype=torch.bool)
    w = None if row_weights is None else row_weights.reshape(1, N).to(torch.float32).contiguous()
    loss = _PairLossFn.apply(z, w, s, present.view(torch.uint8), pi32, pj32, valid, False, 1)
    return loss[0]
