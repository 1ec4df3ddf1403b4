"""Triton kernels for the SCALE pair contrastive losses (docs/contract.md §4) and one-direction InfoNCE.

``contrastive(z, present, logit_scale, row_weights, form, row_range=None)`` -> [M, M] pair losses
``info_nce(a, b, row_weights, scale)`` -> 0-dim loss (one direction of "clip")

A pair (i, j) has two *sides*, side 0 = z[i], side 1 = z[j], over the whole batch B; sample b
is a row of the pair when present[i, b] and present[j, b] (others are masked as rows and as
columns: no compaction, no host sync).  Every logit is s * w_row * G with G a Gram entry
between two sides.  All log-sum-exps are base 2 (exp2/log2); the loss is converted with ln 2.

Forward (one launch over all pairs, nothing B x B stored; design and its bounds in
docs/triton_kernels.md): a program sweeps the column tiles of one row block (a column split
sized for >= 2 programs per SM), each Gram tile summed over D from a fresh zero accumulator in a
software-pipelined loop (the config's num_stages), then a softmax epilogue adds the row sums in
registers (one base-2 LSE per row and slot of a [pairs, 2, slots, B] buffer) and the column sums
with relaxed atomics; "ntxent" adds the upper triangles of the same-side blocks.  Every sum uses a
fixed shift known before the sweep (max(s w pos, |s w| - 95), base 2); the rows without a safe
shift (rare) get their whole LSE, both directions, from a small second launch with an exact
online max.  The positive logits are written by the tile that holds them.

Backward (no atomics): per pair and row chunk, a Triton kernel recomputes the Gram tiles of
the chunk's rows against their columns and writes dG = d loss / d G (both directions'
softmax terms, the positives, self-similarities removed) into a buffer of fixed size
(SCALE_FAST_CONTRASTIVE_BWD_MB, default 64 MiB, independent of B), with per-tile partial
softmax sums of its rows and of its columns for the row-weight and logit-scale gradients.
cuBLAS then forms dZ[rows] += dG Z[cols] and dZ[cols] += dG^T Z[rows] with fp32 accumulation
over square blocks (both GEMMs reduce over a block side), so every dG entry is computed once:
"clip" recomputes the B x B cross block once (B^2 D multiply-adds, then 2 B^2 D in the GEMMs),
and NT-Xent, whose 2B x 2B Gram is symmetric, its cross block plus the blocks on and above the
diagonal of each same-side block: towards 2 B^2 D for dG and 4 B^2 D in the GEMMs at large B,
where the whole Gram took 8 (below one block side, ~5.8k rows in bf16, the same-side blocks are
one diagonal block each, as before).

row_range=(start, stop) (the process-group path, see scale_fast/distributed.py): only the
loss terms of rows whose sample lies in [start, stop) (both sides), against every column,
divided by the global normaliser; row_weights is then the local [stop - start, M, M].  Both
directions are row sweeps then (no column atomics), and the backward adds dG^T Z_rows for the
columns.

Precision: bf16/fp16 inputs use tensor cores with fp32 accumulation (dG kept in bf16 for bf16
inputs, fp32 otherwise).  float32 inputs use exact fp32 dot products (``input_precision="ieee"``)
unless TF32 is enabled by SCALE_FAST_TF32=1 (read at import) or by setting
``scale_fast.backends.triton.contrastive.ALLOW_TF32 = True``; the backward GEMMs follow torch's
``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import interpreted

ALLOW_TF32 = os.environ.get("SCALE_FAST_TF32", "0") == "1"

_INTERPRET = interpreted()
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FORMS = ("ntxent", "clip")
_UNIT = 128  # the column split is a multiple of every BLOCK
# D is zero-padded to a multiple of every BLOCK_D, so that no kernel variant masks the D loop (the
# masked variants spill on sm_90a; see benchmarks/kernel_report.py).  Padding leaves every dot intact.
_D_ALIGN = 16 if _INTERPRET else 64
_ASSUMED_SMS = 132  # H100 / H200 SXM; used where no CUDA device is there to ask


# ----------------------------------------------------------------------------------
# autotune configurations
# ----------------------------------------------------------------------------------
# (BLOCK, BLOCK_D, num_warps, num_stages) per dot class: 16-bit tensor-core dots, TF32 tensor-core
# dots (fp32 operands: twice the registers per tile) and exact fp32 dots (FMA units).  Every set
# is checked for spills and fences on sm_90a and sm_80 by benchmarks/kernel_report.py.
_FWD = {"tc16": ((128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3)),
        "tf32": ((64, 64, 8, 3), (64, 32, 8, 3)),
        "fma": ((64, 16, 4, 2), (32, 16, 4, 2))}
# backward dG tiles: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)
_DG = {"tc16": ((128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3)),
       "tf32": ((128, 64, 64, 8, 3), (128, 64, 32, 8, 3)),
       "fma": ((32, 64, 32, 4, 2), (32, 64, 16, 4, 2))}


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK": 16, "BLOCK_D": 16, "STAGES": 1}, num_warps=4, num_stages=1)]
    out = []
    for cls, table in _FWD.items():
        for block, block_d, warps, stages in table:
            # STAGES: the software pipeline's depth inside the kernel (tl.range takes it as a constexpr)
            cfg = triton.Config({"BLOCK": block, "BLOCK_D": block_d, "STAGES": stages}, num_warps=warps,
                                num_stages=stages)
            cfg.scale_fast_class = cls
            out.append(cfg)
    return out


def _dg_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    out = []
    for cls, table in _DG.items():
        for bm, bn, bd, warps, stages in table:
            cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
            cfg.scale_fast_class = cls
            out.append(cfg)
    return out


def _prune_configs(configs, named_args, **kwargs):
    """The configs of the call's dot class (see _FWD)."""
    if len(configs) <= 1:
        return configs
    z = named_args.get("z_ptr")
    prec = kwargs.get("PRECISION", named_args.get("PRECISION"))
    fp32 = getattr(z, "dtype", None) == torch.float32
    cls = ("fma" if prec == "ieee" else "tf32") if fp32 else "tc16"
    keep = [c for c in configs if getattr(c, "scale_fast_class", None) == cls] or configs
    if kwargs.get("COL_STATS", named_args.get("COL_STATS")):
        # the columns' statistics keep one more [BLOCK_M, BLOCK_N] tile live: 128 x 128 spills (sm_90a)
        keep = [c for c in keep if c.kwargs.get("BLOCK_M", 0) * c.kwargs.get("BLOCK_N", 0) <= 128 * 64] or keep
    return keep


# ----------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------
@triton.jit
def _row_info(pres_ptr, w_ptr, mi, mj, p, offs, B, stride_pm, HAS_W: tl.constexpr):
    """(in-range mask, pair-row mask, row weight, additive mask bias) of samples `offs`."""
    inr = (offs < B) & (offs >= 0)
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
def _col_info(pres_ptr, w_ptr, csh_ptr, mi, mj, p, cols, B, stride_pm, HAS_W: tl.constexpr):
    """(pair mask, weight, additive mask bias, fixed shift or NaN) of the columns `cols`."""
    c_in, c_ok, wc, cbias = _row_info(pres_ptr, w_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
    sh_c = tl.load(csh_ptr + p.to(tl.int64) * B + cols.to(tl.int64), mask=c_ok, other=float("nan"))
    return c_ok, wc, cbias, sh_c


@triton.jit
def _sweep(z_ptr, pres_ptr, w_ptr, pos2_ptr, colsum_ptr, csh_ptr, p, mi, mj, xm, ym, ys, s2,
           row0, row_end, cb_lo, cb_hi, same_side, write_pos, do_cols,
           B, D, stride_zm, stride_zb, stride_pm,
           HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
           DOT_F32: tl.constexpr, EVEN_D: tl.constexpr, STAGES: tl.constexpr, FIXED: tl.constexpr):
    """Rows row0 .. row0+BLOCK (< row_end) of side xm against column tiles [cb_lo, cb_hi) of side ym.

    Returns (rows, row-ok mask, m, l) with the row LSE = m + log2(l) over those columns (base 2).
    FIXED: the rows' fixed shifts (csh, base 2; m is that shift and the tile sums simply add; NaN
    for a row without one); else an exact online max.  same_side: drop self-similarities; write_pos: store the positive
    logits of the rows found in these tiles; do_cols: add the columns' fixed-shift sums into colsum
    (relaxed atomics), except on tiles that hold self-similarities (their row direction already
    covers them), for the columns whose shift csh is not NaN.
    """
    ar = tl.arange(0, BLOCK)
    rows = row0 + ar
    r_in, r_ok, wr, rbias = _row_info(pres_ptr, w_ptr, mi, mj, p, rows, B, stride_pm, HAS_W)
    r_ok = r_ok & (rows < row_end)
    wr = tl.where(r_ok, wr, 0.0)
    rbias = tl.where(r_ok, rbias, float("-inf"))
    rows64 = rows.to(tl.int64)
    xbase = z_ptr + xm.to(tl.int64) * stride_zm
    ybase = z_ptr + ym.to(tl.int64) * stride_zm
    mult_r = s2 * wr
    if FIXED:
        m_i = tl.load(csh_ptr + p.to(tl.int64) * B + rows64, mask=r_ok, other=0.0)
    else:
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    n_cb = tl.where(tl.max(r_ok.to(tl.int32), 0) > 0, cb_hi - cb_lo, 0)
    for t in range(0, n_cb):
        cb = cb_lo + t
        cols = cb * BLOCK + ar
        cols64 = cols.to(tl.int64)
        if FIXED:  # the columns' metadata first, loaded while the tile's MMAs run (the online
            # path, rare, loads them after: its larger epilogue state leaves no registers for them)
            c_ok, wc, cbias, sh_c = _col_info(pres_ptr, w_ptr, csh_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
        c_pre = cols < B
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # a fresh sum per tile
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            x = _load_rows(xbase, rows64, r_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
            y = _load_rows(ybase, cols64, c_pre, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
        if not FIXED:
            c_ok, wc, cbias, sh_c = _col_info(pres_ptr, w_ptr, csh_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
        overlap = (cb * BLOCK < row0 + BLOCK) & (cb * BLOCK + BLOCK > row0)
        if do_cols & ((same_side & overlap) == 0):
            # column direction first, so that only G and one tile are live at a time
            mult_c = s2 * wc
            c_fix = c_ok & (sh_c == sh_c)
            csum = tl.sum(tl.exp2(acc * mult_c[None, :] + rbias[:, None] - sh_c[None, :]), 0)
            tl.atomic_add(colsum_ptr + (p.to(tl.int64) * 2 + ys) * B + cols64, csum, mask=c_fix, sem="relaxed")
        qk = acc * mult_r[:, None] + cbias[None, :]
        if same_side & overlap:
            qk = tl.where(rows[:, None] == cols[None, :], float("-inf"), qk)
        if write_pos & overlap:
            pos2 = tl.sum(tl.where(rows[:, None] == cols[None, :], qk, 0.0), 1)
            here = r_ok & (rows >= cb * BLOCK) & (rows < cb * BLOCK + BLOCK)
            tl.store(pos2_ptr + p.to(tl.int64) * B + rows64, pos2, mask=here)
        if FIXED:
            l_i += tl.sum(tl.exp2(qk - m_i[:, None]), 1)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
            m_i = m_new
    return rows, r_ok, m_i, l_i


@triton.jit
def _lse2(m, l):
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log2(l)


# ----------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------
@triton.autotune(configs=_fwd_configs(), key=["B", "D", "NSEG", "HAS_W", "BOTH_DIR", "LOCAL"],
                 prune_configs_by={"early_config_prune": _prune_configs},
                 # which `part` slots a config writes depends on BLOCK (NT-Xent's triangle splits): a
                 # losing config's slots would be merged with the winner's, so `part` is restored
                 reset_to_zero=["colsum_ptr"], restore_value=["part_ptr"])
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit(do_not_specialize=["R0", "R1", "NSLOT", "NS", "CL"])
def _contrastive_fwd_kernel(
    z_ptr, pres_ptr, w_ptr, pi_ptr, pj_ptr, scale_ptr,
    part_ptr, pos2_ptr, colsum_ptr, csh_ptr,
    B, D, stride_zm, stride_zb, stride_pm, R0, R1, NSLOT, NS, CL,
    HAS_W: tl.constexpr, BOTH_DIR: tl.constexpr, NSEG: tl.constexpr, LOCAL: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr, STAGES: tl.constexpr,
):
    # Grid (square programs + triangle programs, pairs).  Square program = (row side xs, row
    # block, column side jy, column split cs); full mode: xs = 0 against ys = 1 only.  Triangle
    # program (full "ntxent"): (side h, folded row blocks q and NRB-1-q, split of their tiles).
    t = tl.program_id(0)
    p = tl.program_id(1)
    mi = tl.load(pi_ptr + p)
    mj = tl.load(pj_ptr + p)
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    NCB = tl.cdiv(B, BLOCK)
    NRB = tl.cdiv(R1 - R0, BLOCK)
    TPS = CL // BLOCK
    NXS: tl.constexpr = 2 if LOCAL else 1
    NYS: tl.constexpr = NSEG if LOCAL else 1
    n_sq = NXS * NRB * NYS * NS
    NQ = (NCB + 1) // 2
    NS1 = tl.cdiv(NCB + 1, TPS)
    tri = t >= n_sq
    t1 = t - n_sq
    # square decode
    xs_sq = t // (NRB * NYS * NS)
    r_sq = t % (NRB * NYS * NS)
    jy = r_sq % (NYS * NS) // NS
    cs_sq = r_sq % NS
    # triangle decode
    h = t1 // (NQ * NS1)
    q = t1 % (NQ * NS1) // NS1
    cs_tr = t1 % NS1
    xs = tl.where(tri, h, xs_sq)
    ys = tl.where(tri, h, tl.where(jy == 0, 1 - xs_sq, xs_sq))
    xm = tl.where(xs == 0, mi, mj)
    ym = tl.where(ys == 0, mi, mj)
    do_cols = BOTH_DIR & (LOCAL == 0)
    nph = tl.where(tri, tl.where(NCB - 1 - q > q, 2, 1), 1)
    for ph in range(0, nph):
        # phase rows / tiles
        lo1 = cs_tr * TPS
        hi1 = lo1 + TPS
        first_len = NCB - q
        rb_tri = tl.where(ph == 0, q, NCB - 1 - q)
        t_lo = tl.where(ph == 0, lo1, tl.maximum(lo1, first_len))
        t_hi = tl.where(ph == 0, tl.minimum(hi1, first_len), tl.minimum(hi1, NCB + 1))
        cb_lo = tl.where(tri, tl.where(ph == 0, q + t_lo, rb_tri + t_lo - first_len), cs_sq * TPS)
        cb_hi = tl.where(tri, tl.where(ph == 0, q + t_hi, rb_tri + t_hi - first_len),
                         tl.minimum(NCB, (cs_sq + 1) * TPS))
        cb_hi = tl.maximum(cb_hi, cb_lo)
        row0 = tl.where(tri, rb_tri * BLOCK, R0 + (r_sq // (NYS * NS)) * BLOCK)
        slot = tl.where(tri, NYS * NS + cs_tr, jy * NS + cs_sq)
        # every row's sums with its fixed shift; a row without one gets NaN here, and its whole LSE
        # from the exact fallback launch
        rows, r_ok, m_i, l_i = _sweep(
            z_ptr, pres_ptr, w_ptr, pos2_ptr, colsum_ptr, csh_ptr, p, mi, mj, xm, ym, ys, s2,
            row0, R1, cb_lo, cb_hi, xs == ys, (xs == 0) & (ys == 1), do_cols,
            B, D, stride_zm, stride_zb, stride_pm,
            HAS_W, BLOCK, BLOCK_D, PRECISION, DOT_F32, EVEN_D, STAGES, True)
        lse = _lse2(m_i, l_i)
        dst = part_ptr + ((p.to(tl.int64) * 2 + xs) * NSLOT + slot) * B + rows.to(tl.int64)
        tl.store(dst, lse, mask=r_ok & ((rows * 0 + cb_hi) > cb_lo))


@triton.autotune(configs=_fwd_configs(), key=["B", "D", "NSEG", "HAS_W"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _contrastive_fwd_fallback_kernel(
    z_ptr, pres_ptr, w_ptr, pi_ptr, pj_ptr, scale_ptr, csh_ptr, fb_ptr,
    B, D, stride_zm, stride_zb, stride_pm, R0, R1,
    HAS_W: tl.constexpr, NSEG: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr, STAGES: tl.constexpr,
):
    # The exact LSE (online max) of the rows without a fixed shift, against all their columns
    # (grid (2 * NRB, pairs)): side h rows of block rb (samples R0 + rb * BLOCK ..., < R1) against
    # the other side, and with NSEG == 2 against their own side, self removed.  Programs whose block
    # holds no such row exit at once (the common case).  Unpipelined (the config's STAGES unused):
    # the online max keeps more of the epilogue live, and pipelined some tiles spill on sm_80.
    t = tl.program_id(0)
    p = tl.program_id(1)
    NRB = tl.cdiv(R1 - R0, BLOCK)
    h = t // NRB
    row0 = R0 + (t % NRB) * BLOCK
    mi = tl.load(pi_ptr + p)
    mj = tl.load(pj_ptr + p)
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    rows = row0 + tl.arange(0, BLOCK)
    r_in, ok, wr, rbias = _row_info(pres_ptr, w_ptr, mi, mj, p, rows, B, stride_pm, HAS_W)
    ok = ok & (rows < R1)
    sh = tl.load(csh_ptr + p.to(tl.int64) * B + rows, mask=ok, other=0.0)
    need = ok & (sh != sh)
    if tl.max(need.to(tl.int32), 0) > 0:
        xm = tl.where(h == 0, mi, mj)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK,), dtype=tl.float32)
        for ph in range(0, NSEG):
            ym = tl.where(ph == 0, tl.where(h == 0, mj, mi), xm)
            rows2, ok2, m2, l2 = _sweep(
                z_ptr, pres_ptr, w_ptr, fb_ptr, fb_ptr, csh_ptr, p, mi, mj, xm, ym, h, s2,
                row0, R1, 0, tl.cdiv(B, BLOCK), ph == 1, 0, 0,
                B, D, stride_zm, stride_zb, stride_pm,
                HAS_W, BLOCK, BLOCK_D, PRECISION, DOT_F32, EVEN_D, 1, False)
            mx = tl.maximum(m, m2)
            mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
            l = l * tl.exp2(m - mx_safe) + l2 * tl.exp2(m2 - mx_safe)
            m = mx
        tl.store(fb_ptr + (p.to(tl.int64) * 2 + h) * B + rows.to(tl.int64), _lse2(m, l), mask=need)


# ----------------------------------------------------------------------------------
# backward: dG tiles of a row chunk into a buffer (the GEMMs run in cuBLAS)
# ----------------------------------------------------------------------------------
@triton.autotune(configs=_dg_configs(), key=["NKEY", "D", "HAS_W", "ROW_TERM", "COL_TERM", "COL_STATS"],
                 prune_configs_by={"early_config_prune": _prune_configs},
                 # which statistic slots a config writes depends on its tiles: a losing config's
                 # slots would be summed with the winner's
                 reset_to_zero=["dot_ptr", "psum_ptr", "cdot_ptr", "cpsum_ptr"])
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit(do_not_specialize=["p", "mi", "mj", "xs", "ys0", "ys1", "R0", "NROWS", "C0", "C1"])
def _contrastive_dg_kernel(
    z_ptr, pres_ptr, w_ptr, scale_ptr, coef_ptr, lse_ptr,
    dg_ptr, dot_ptr, psum_ptr, gpos_ptr, gtile_ptr, cdot_ptr, cpsum_ptr,
    p, mi, mj, xs, ys0, ys1, R0, NROWS, C0, C1, NCOL, NKEY,
    B, D, stride_zm, stride_zb, stride_pm, stride_dg, stride_st, stride_cst,
    HAS_W: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, COL_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_D: tl.constexpr, GROUP: tl.constexpr = 8,
):
    # Grid (row tiles x column tiles, column segments).  Rows: samples R0 + [0, NROWS) of side xs.
    # Column segment k: samples Ck + [0, NCOL) of side ysk, at buffer columns k * NCOL + [0, NCOL).
    # dG[r, c] = coef * s * (ROW_TERM * w_r P_row[r, c] + COL_TERM * w_c P_col[c, r]) minus the
    # positives' s * w, self-similarities removed; P_row uses the rows' LSE, P_col the columns'.
    # Row statistics per column tile at dot/psum[tile, row]: sum_c P_row (G - gpos_r) and sum_c P_row
    # (gpos: every sample's positive cosine, [P, B]); the tile holding a row's positive also stores
    # that G as this tile rounded it at gtile[xs, row], so that the host takes the positive's own
    # term P (G - gpos) off again (a rounding, not a where on every tile: fewer registers).  The
    # ratio is d loss / d (s w_r) without cancellation: no term is the positive's P G, which
    # sum_c P G - G_pos would take off again.
    # COL_STATS: the columns' own softmax statistics too, per row tile at cdot/cpsum[tm, column]:
    # a block computed once serves the gradients of its rows and of its columns.  NKEY: the
    # autotune key (the problem's width).
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    n_m = tl.cdiv(NROWS, BLOCK_M)
    n_n = tl.cdiv(NCOL, BLOCK_N)
    in_group = GROUP * n_n
    first = (pid // in_group) * GROUP
    gsize = tl.minimum(n_m - first, GROUP)
    tm = first + (pid % in_group) % gsize
    tn = (pid % in_group) // gsize
    ys = tl.where(seg == 0, ys0, ys1)
    c0 = tl.where(seg == 0, C0, C1)
    xm = tl.where(xs == 0, mi, mj)
    ym = tl.where(ys == 0, mi, mj)
    lrow = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    lcol = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = R0 + lrow
    cols = c0 + lcol
    r_in, r_ok, wr, rbias = _row_info(pres_ptr, w_ptr, mi, mj, p, rows, B, stride_pm, HAS_W)
    c_in, c_ok, wc, cbias = _row_info(pres_ptr, w_ptr, mi, mj, p, cols, B, stride_pm, HAS_W)
    r_ok = r_ok & (lrow < NROWS)
    c_ok = c_ok & (lcol < NCOL)
    rbias = tl.where(r_ok, rbias, float("-inf"))
    cbias = tl.where(c_ok, cbias, float("-inf"))
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    xbase = z_ptr + xm.to(tl.int64) * stride_zm
    ybase = z_ptr + ym.to(tl.int64) * stride_zm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=3):
        x = _load_rows(xbase, rows64, r_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
        y = _load_rows(ybase, cols64, c_ok, d0, D, stride_zb, BLOCK_D, EVEN_D, DOT_F32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    s = tl.load(scale_ptr).to(tl.float32)
    s2 = s * 1.4426950408889634
    cs = tl.load(coef_ptr + p).to(tl.float32) * s
    lbase = lse_ptr + p.to(tl.int64) * 2 * B
    gbase = gpos_ptr + p.to(tl.int64) * B
    same = xs == ys
    # dg accumulates coef * s * (...) tile by tile; acc (= G) stays live, one more tile at a time
    if ROW_TERM:
        # +inf LSE outside the pair: the probabilities are exactly 0 there
        lse_r = tl.load(lbase + xs * B + rows64, mask=r_ok, other=float("inf"))
        pr = tl.exp2(acc * (s2 * wr)[:, None] - lse_r[:, None] + cbias[None, :])
        if same:
            pr = tl.where(rows[:, None] == cols[None, :], 0.0, pr)
        st = (seg * n_n + tn).to(tl.int64) * stride_st + lrow
        g_r = tl.load(gbase + rows64, mask=r_ok, other=0.0)
        tl.store(dot_ptr + st, tl.sum(pr * (acc - g_r[:, None]), 1), mask=lrow < NROWS)
        tl.store(psum_ptr + st, tl.sum(pr, 1), mask=lrow < NROWS)
        if same == 0:
            here = r_ok & (rows >= c0 + tn * BLOCK_N) & (rows < c0 + tn * BLOCK_N + BLOCK_N)
            tl.store(gtile_ptr + xs * B + rows64, tl.sum(tl.where(rows[:, None] == cols[None, :], acc, 0.0), 1),
                     mask=here)
        dg = pr * (cs * wr)[:, None]
    else:
        dg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COL_TERM:
        lse_c = tl.load(lbase + ys * B + cols64, mask=c_ok, other=float("inf"))
        if COL_STATS:
            # G - gpos_c in place of G (its last use), the softmax from it: no extra tile live
            g_c = tl.load(gbase + cols64, mask=c_ok, other=0.0)
            acc = acc - g_c[None, :]
            pc = tl.exp2(acc * (s2 * wc)[None, :] + (g_c * (s2 * wc) - lse_c)[None, :] + rbias[:, None])
        else:
            pc = tl.exp2(acc * (s2 * wc)[None, :] - lse_c[None, :] + rbias[:, None])
        if same:
            pc = tl.where(rows[:, None] == cols[None, :], 0.0, pc)
        dg += pc * (cs * wc)[None, :]
        if COL_STATS:
            cst = tm.to(tl.int64) * stride_cst + lcol
            tl.store(cdot_ptr + cst, tl.sum(pc * acc, 0), mask=lcol < NCOL)
            tl.store(cpsum_ptr + cst, tl.sum(pc, 0), mask=lcol < NCOL)
    if same == 0:
        # the positives' -s * w (row r's own, and column c's when its softmax term is in)
        npos = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ROW_TERM:
            npos += cs * wr
        if COL_TERM:
            npos += cs * wr  # the positive of a row is the same sample: w_c = w_r there
        dg = tl.where((rows[:, None] == cols[None, :]) & r_ok[:, None], dg - npos[:, None], dg)
    dst = dg_ptr + lrow.to(tl.int64)[:, None] * stride_dg + (seg * NCOL + lcol)[None, :]
    tl.store(dst, dg.to(dg_ptr.dtype.element_ty), mask=(lrow < NROWS)[:, None] & (lcol < NCOL)[None, :])


# ----------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------
_PAIR_CACHE: dict = {}
_SMS: dict = {}


def _pairs(M: int, device: torch.device):
    key = (M, str(device))
    if key not in _PAIR_CACHE:
        iu = torch.triu_indices(M, M, 1)
        _PAIR_CACHE[key] = (iu[0].to(device=device, dtype=torch.int32),
                            iu[1].to(device=device, dtype=torch.int32),
                            iu[0].to(device), iu[1].to(device))
    return _PAIR_CACHE[key]


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2 if _INTERPRET else _ASSUMED_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _column_split(B: int, rows: int, pairs: int, row_sides: int, col_sides: int, sms: int,
                  unit: int = _UNIT) -> int:
    """Columns per program (a multiple of `unit`) so that the square programs number >= 2 per SM.

    Row blocks are counted at the largest BLOCK (`unit`); smaller blocks only add programs.
    Returns at least `unit`, so a program sweeps >= 1 tile; when even one tile per program is
    too few programs, that is every tile of the problem."""
    blocks = max(1, -(-rows // unit)) * pairs * row_sides * col_sides
    want = -(-2 * sms // blocks)
    if want <= 1:
        return max(unit, -(-B // unit) * unit)
    return max(unit, (B // want) // unit * unit)


def forward_programs(B: int, block: int, pairs: int, form: str, sms: int, row_range=None) -> int:
    """Programs of one forward launch (the kernel's grid), for the kernel report and tests."""
    nseg, local = (2 if form == "ntxent" else 1), row_range is not None
    r0, r1 = row_range if local else (0, B)
    nxs, nys = (2, nseg) if local else (1, 1)
    CL = _column_split(B, r1 - r0, pairs, nxs, nys, sms)
    return pairs * _grid_size(B, r1 - r0, block, CL, nseg, local)


def _grid_size(B, nrows, block, CL, nseg, local):
    NCB = -(-B // block)
    NRB = -(-nrows // block)
    NS = -(-B // CL)
    nxs, nys = (2, nseg) if local else (1, 1)
    n = nxs * NRB * nys * NS
    if nseg == 2 and not local:
        tps = CL // block
        n += 2 * ((NCB + 1) // 2) * (-(-(NCB + 1) // tps))
    return n


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if ALLOW_TF32 else "ieee"
    return "ieee"


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits:
    # upcast there (after the same rounding); compiled kernels use bf16 tensor cores.
    return _INTERPRET and dtype == torch.bfloat16


def _lse2_slots(part: torch.Tensor) -> torch.Tensor:
    """[P, 2, S, B] base-2 partial LSEs -> [P, 2, B] (exact for -inf slots)."""
    mx = part.amax(dim=2)
    mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    return mx_safe + torch.log2(torch.exp2(part - mx_safe[:, :, None]).sum(2))


def _logaddexp2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mx = torch.maximum(a, b)
    mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    return mx_safe + torch.log2(torch.exp2(a - mx_safe) + torch.exp2(b - mx_safe))


# Fixed shifts (base 2) of the row and column sums: every term 2^(logit - shift) must stay <= 2^95 (no
# overflow of up to 2^25 terms) and the largest >= 2^-96 (no underflow).  Logits lie in [-|s w|, |s w|]
# and the largest is at least the positive's, s w pos, so shift = max(s w pos, |s w| - 95) works whenever
# shift - s w pos <= 95.  Shifting by the positive's own logit also keeps the sums exact where one term
# dominates (log2(2^y) ~ y).  pos only needs to be approximate: a bf16 product is off by < 1 here.
_SHIFT_MARGIN = 95.0


def _sum_shift(z, w, scale32, P):
    """[P, B] fp32 shift of every (pair, sample) row and column sum, NaN where none is safe (those
    rows keep an online max, those columns go to the exact fallback launch)."""
    M, B, D = z.shape
    iu = torch.triu_indices(M, M, 1)
    pos = torch.stack([torch.bmm(z[i].unsqueeze(1), z[j].unsqueeze(2)).reshape(B)
                       for i, j in zip(iu[0].tolist(), iu[1].tolist())]).to(torch.float32)
    mult = scale32 * _LOG2E * (w if w is not None else torch.ones_like(pos))
    plog = mult * pos
    shift = torch.maximum(plog, mult.abs() - _SHIFT_MARGIN)
    return torch.where(shift - plog <= _SHIFT_MARGIN, shift, torch.full_like(shift, float("nan")))


def _forward_lse(z, w, scale32, present_u8, pi32, pj32, both_dir, nseg, row_range):
    """(lse2 [P, 2, B], pos2 [P, B]): base-2 LSE of every (pair, side, row) and positive logits."""
    M, B, D = z.shape
    P = pi32.numel()
    dev = z.device
    local = row_range is not None
    r0, r1 = row_range if local else (0, B)
    nxs, nys = (2, nseg) if local else (1, 1)
    CL = _column_split(B, r1 - r0, P, nxs, nys, _num_sms(dev))
    NS = -(-B // CL)
    nslot = nys * NS + (-(-(B + 2 * _UNIT) // CL) if nseg == 2 and not local else 0)
    csh = _sum_shift(z, w, scale32, P)
    part = torch.full((P, 2, nslot, B), float("-inf"), device=dev, dtype=torch.float32)
    pos2 = torch.zeros((P, B), device=dev, dtype=torch.float32)
    colsum = torch.zeros((P, 2, B), device=dev, dtype=torch.float32)
    has_w = w is not None
    w_arg = w if has_w else pos2
    prec, f32 = _precision(z.dtype), _dot_f32(z.dtype)
    grid = lambda meta: (_grid_size(B, r1 - r0, meta["BLOCK"], CL, nseg, local), P)  # noqa: E731
    _contrastive_fwd_kernel[grid](
        z, present_u8, w_arg, pi32, pj32, scale32, part, pos2, colsum, csh,
        B, D, z.stride(0), z.stride(1), present_u8.stride(0), r0, r1, nslot, NS, CL,
        HAS_W=has_w, BOTH_DIR=both_dir, NSEG=nseg, LOCAL=local, PRECISION=prec, DOT_F32=f32,
    )
    lse2 = _lse2_slots(part)  # NaN for the rows without a fixed shift
    del part
    if both_dir and not local:
        lse2 = _logaddexp2(lse2, torch.log2(colsum) + csh[:, None, :])
    # the rows without a fixed shift (rare): their whole LSE, exact, from a second launch
    fb = torch.full((P, 2, B), float("-inf"), device=dev, dtype=torch.float32)
    grid_fb = lambda meta: (2 * triton.cdiv(r1 - r0, meta["BLOCK"]), P)  # noqa: E731
    _contrastive_fwd_fallback_kernel[grid_fb](
        z, present_u8, w_arg, pi32, pj32, scale32, csh, fb,
        B, D, z.stride(0), z.stride(1), present_u8.stride(0), r0, r1,
        HAS_W=has_w, NSEG=nseg, PRECISION=prec, DOT_F32=f32,
    )
    need = torch.isnan(csh)
    if local:
        need[:, :r0] = False
        need[:, r1:] = False
    lse2 = torch.where(need[:, None, :], fb, lse2)
    return lse2, pos2


def _bwd_budget():
    """(bytes of the dG buffer, SCALE_FAST_CONTRASTIVE_BWD_MB (64) read at every call; the row unit)."""
    return float(os.environ.get("SCALE_FAST_CONTRASTIVE_BWD_MB", "64")) * 2 ** 20, 16 if _INTERPRET else _UNIT


def _bwd_chunk_rows(ncols: int, elem: int) -> int:
    """Rows per backward chunk against ncols columns, the dG buffer within the budget."""
    budget, unit = _bwd_budget()
    return max(unit, int(budget // max(1, ncols * elem)) // unit * unit)


def _bwd_block_side(elem: int) -> int:
    """Side of the square dG blocks of the mirrored jobs: side^2 elements within the budget."""
    budget, unit = _bwd_budget()
    return max(unit, int(math.isqrt(int(budget // elem))) // unit * unit)


def _dg_min_blocks():
    """(smallest BLOCK_M, smallest BLOCK_N) of the dG kernel's configs: the statistic slots per row
    (one per column tile) and per column (one per row tile) that any config may write."""
    cfgs = _contrastive_dg_kernel.configs
    return min(c.kwargs["BLOCK_M"] for c in cfgs), min(c.kwargs["BLOCK_N"] for c in cfgs)


_MIXED_GEMM: dict = {}


def _mixed_gemm(device: torch.device, dtype: torch.dtype) -> str:
    """How torch multiplies `dtype` (16-bit) matrices into fp32 on this device, asked once: "addmm" (one
    GEMM adding into an fp32 tensor, out_dtype=float32), "mm" (an fp32 product, then added) or ""."""
    key = (device.type, dtype)
    if key not in _MIXED_GEMM:
        acc = torch.zeros((1, 1), device=device, dtype=torch.float32)
        one = torch.ones((1, 1), device=device, dtype=dtype)
        form = ""
        try:
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            form = "addmm" if float(acc) == 1.0 else ""
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        if not form:
            try:
                torch.mm(one, one, out_dtype=torch.float32)
                form = "mm"
            except (TypeError, RuntimeError, NotImplementedError):
                pass
        _MIXED_GEMM[key] = form
    return _MIXED_GEMM[key]


def _pos_cos(z: torch.Tensor, pis, pjs) -> torch.Tensor:
    """[P, B] fp32: every sample's cosine between the two sides of each pair (z_i . z_j, unit rows).

    Any rounding of it will do for the dG kernel's statistics (the positive's own entry is left out
    there); 16-bit rows are multiplied with fp32 output, never rounded back to 16 bits."""
    M, B, D = z.shape
    out = torch.empty((len(pis), B), device=z.device, dtype=torch.float32)
    mixed = z.dtype != torch.float32 and _mixed_gemm(z.device, z.dtype) != ""
    for p, (i, j) in enumerate(zip(pis, pjs)):
        a, b = z[i].unsqueeze(1), z[j].unsqueeze(2)
        if z.dtype == torch.float32:
            torch.bmm(a, b, out=out[p].view(B, 1, 1))
        elif mixed:
            out[p] = torch.bmm(a, b, out_dtype=torch.float32).view(B)
        else:
            out[p] = torch.bmm(a.float(), b.float()).view(B)
    return out


def _mm_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b with fp32 accumulation: one GEMM into out (beta = 1), also for 16-bit a, b where
    torch has a 16-bit GEMM with fp32 output (no fp32 copies, no separate add pass)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        out.addmm_(a, b)
        return
    form = _mixed_gemm(out.device, a.dtype) if a.dtype == b.dtype else ""
    if form == "addmm":
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    elif form == "mm":
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        out.addmm_(a.float(), b.float())


def _backward(z, w, scale32, present_u8, pi32, pj32, lse2, coef, both_dir, nseg, row_range, need_dw):
    """(dz [M, B, D] fp32, dw [P, B] fp32 or None, ds fp32 0-dim) of sum_p coef[p] * loss_p.

    Every pair is a list of jobs: rows of one side, in chunks, against columns.  The kernel writes
    a block of dG into a buffer and the rows' softmax statistics; cuBLAS adds dG @ Z_columns to the
    rows' gradient.  A mirrored job runs square blocks (side ~ sqrt(budget)), also adds
    dG^T @ Z_rows to the columns' gradient and takes the columns' statistics from the same tiles,
    so each dG entry is computed once and both GEMMs reduce over a block side with block-sized
    outputs.  Without row_range, both directions (CLIP, NT-Xent) run the cross block (side-0 rows
    x side-1 columns) mirrored, and NT-Xent's symmetric same-side blocks only the blocks on and
    above the diagonal (a diagonal block whole, not mirrored).  row_range and one direction keep
    row chunks against whole column segments.
    """
    M, B, D = z.shape
    P = pi32.numel()
    dev = z.device
    local = row_range is not None
    r0, r1 = row_range if local else (0, B)
    dz = torch.zeros((M, B, D), device=dev, dtype=torch.float32)
    dwraw = torch.zeros((P, B), device=dev, dtype=torch.float32)  # d loss_p / d (s w) per sample, unscaled
    has_w = w is not None
    wv = w if has_w else torch.ones((P, B), device=dev, dtype=torch.float32)
    buf_dtype = torch.bfloat16 if (z.dtype == torch.bfloat16 and dev.type == "cuda") else torch.float32
    zg = z if buf_dtype == z.dtype else None  # GEMM operand dtype must match the buffer's
    iu = torch.triu_indices(M, M, 1)  # on the host: no device sync
    pis, pjs = iu[0].tolist(), iu[1].tolist()
    gpos = _pos_cos(z, pis, pjs)
    prec, f32 = _precision(z.dtype), _dot_f32(z.dtype)
    elem = torch.finfo(buf_dtype).bits // 8
    for p in range(P):
        mi, mj = pis[p], pjs[p]
        mods = (mi, mj)
        zc = {}

        def zside(side, start, stop):
            # rows of one side as a GEMM operand: a view of z, or of ONE fp32 copy of the side
            # (fp16 inputs), whatever the number of chunks and triangles that slice it
            if side not in zc:
                v = z[mods[side]]
                zc[side] = v if zg is not None else v.float()
            return zc[side][start:stop]

        # (row side, row start, row stop, [(col side, col start, col stop)] or None for the
        #  same-side blocks on and above the diagonal, row_term, col_term, mirrored)
        jobs = []
        if local:
            for xs in (0, 1):
                ysides = (1 - xs,) if nseg == 1 else (0, 1)
                jobs.append((xs, r0, r1, [(ys, 0, B) for ys in ysides], True, False, False))
                for ys in ysides:  # the columns' gradient from these rows: rows of dG^T
                    jobs.append((ys, 0, B, [(xs, r0, r1)], False, True, False))
        elif both_dir:
            jobs.append((0, 0, B, [(1, 0, B)], True, True, True))
            if nseg == 2:
                jobs += [(xs, 0, B, None, True, True, True) for xs in (0, 1)]
        else:  # one direction: side 1 rows only get the transposed term
            jobs.append((0, 0, B, [(1, 0, B)], True, False, False))
            jobs.append((1, 0, B, [(0, 0, B)], False, True, False))
        # [sum_c P (G - G_pos), sum_c P] of every (side, sample)'s softmax row, and its positive's G as
        # the kernel's tile rounded it (for the rows of side-0 x side-1 blocks)
        stat_t = torch.zeros((2, 2, B), device=dev, dtype=torch.float32)
        gtile = torch.zeros((2, B), device=dev, dtype=torch.float32)
        for xs, a0, a1, csegs, row_term, col_term, mirrored in jobs:
            tri = csegs is None
            ys_m, lo, hi = (xs, 0, B) if tri else csegs[0]
            if a1 <= a0 or hi <= lo:
                continue
            if mirrored:  # square blocks: both GEMMs reduce over a block side, their outputs stay small
                ch = cw = _bwd_block_side(elem)
                nseg_c = 1
            else:  # rows against whole column segments
                nseg_c, cw = len(csegs), csegs[0][2] - csegs[0][1]
                ch = min(a1 - a0, _bwd_chunk_rows(nseg_c * cw, elem))
            ch, cw = min(ch, a1 - a0), min(cw, hi - lo)
            buf = torch.empty((ch, nseg_c * cw), device=dev, dtype=buf_dtype)
            # statistics of a block, one buffer zeroed and summed once per block: [dot | psum,
            # rows (a slot per column tile) | columns (mirrored: a slot per row tile), slot, row or column]
            bm, bn = _dg_min_blocks()
            n_slot = max(nseg_c * triton.cdiv(cw, bn), triton.cdiv(ch, bm) if mirrored else 0)
            stats = torch.empty((2, 2 if mirrored else 1, n_slot, max(ch, cw) if mirrored else ch), device=dev,
                                dtype=torch.float32)
            dot, psum = stats[0, 0], stats[1, 0]
            cdot, cpsum = (stats[0, 1], stats[1, 1]) if mirrored else (dot, psum)
            has_stats = row_term or mirrored
            for c0 in range(a0, a1, ch):
                nr = min(ch, a1 - c0)
                if mirrored:  # a triangle: the blocks from the diagonal one on
                    blocks = [[(ys_m, b0, min(b0 + cw, hi))] for b0 in range(c0 if tri else lo, hi, cw)]
                else:
                    blocks = [csegs]
                for segs in blocks:
                    ncol = segs[0][2] - segs[0][1]
                    b0 = segs[0][1]
                    diag = tri and b0 == c0  # symmetric: whole, not mirrored, its rows give every statistic
                    if has_stats:
                        stats.zero_()
                    grid = lambda meta: (triton.cdiv(nr, meta["BLOCK_M"]) * triton.cdiv(ncol, meta["BLOCK_N"]),  # noqa: E731
                                         nseg_c)
                    _contrastive_dg_kernel[grid](
                        z, present_u8, wv, scale32, coef, lse2,
                        buf, dot, psum, gpos, gtile, cdot, cpsum,
                        p, mi, mj, xs, segs[0][0], segs[-1][0], c0, nr, b0, segs[-1][1], ncol, B,
                        B, D, z.stride(0), z.stride(1), present_u8.stride(0), buf.stride(0), dot.stride(0),
                        cdot.stride(0),
                        HAS_W=has_w, ROW_TERM=row_term, COL_TERM=col_term, COL_STATS=mirrored, PRECISION=prec,
                        DOT_F32=f32,
                    )
                    out = dz[mods[xs], c0:c0 + nr]
                    for k, (ys, s0, s1) in enumerate(segs):
                        _mm_acc(out, buf[:nr, k * ncol:(k + 1) * ncol], zside(ys, s0, s1))
                    if has_stats:
                        total = stats.sum(2)  # [dot | psum, rows | columns, row or column]
                    if row_term:
                        stat_t[:, xs, c0:c0 + nr] += total[:, 0, :nr]
                    if mirrored and not diag:
                        ys, s0, s1 = segs[0]
                        _mm_acc(dz[mods[ys], s0:s1], buf[:nr, :ncol].t(), zside(xs, c0, c0 + nr))
                        stat_t[:, ys, s0:s1] += total[:, 1, :ncol]
        if both_dir and not local:  # the cross block's columns (side 1) share their rows' positive entries
            gtile[1] = gtile[0]
        # the positive's own term P_pos (G_pos - gpos), nothing but G's two roundings, taken off: then no
        # term of dot is the positive's (P (G - G_pos) summed over the other entries only)
        p_pos = torch.exp2(gtile * (scale32 * _LOG2E * wv[p]) - lse2[p])
        dot_t = stat_t[0] - p_pos * (gtile - gpos[p])
        psum_t = stat_t[1]
        raw = torch.where(psum_t > 0, dot_t / psum_t.clamp_min(1e-30), torch.zeros_like(psum_t))
        dwraw[p] = raw.sum(0)
    valid = (present_u8[pi32.long()] != 0) & (present_u8[pj32.long()] != 0)
    if local:
        valid[:, :r0] = False
        valid[:, r1:] = False
    dwraw = torch.where(valid, dwraw, torch.zeros_like(dwraw))
    ds = (coef[:, None] * wv * dwraw).sum()
    dw = (coef[:, None] * scale32 * dwraw) if need_dw else None
    return dz, dw, ds


class _PairLossFn(torch.autograd.Function):
    """Per-pair losses [P] of pairs (pi[p], pj[p]); z [M, B, D]; w [P, B] or None."""

    @staticmethod
    def forward(ctx, z, w, scale, present_u8, pi32, pj32, valid, both_dir, nseg, row_range):
        M, B, D = z.shape
        dev = z.device
        scale32 = scale.detach().reshape(()).to(device=dev, dtype=torch.float32)
        wd = w.detach() if w is not None else None
        n = valid.sum(1)  # the global normaliser (every row of the pair)
        rows_valid = valid
        if row_range is not None:
            rows_valid = valid.clone()
            rows_valid[:, :row_range[0]] = False
            rows_valid[:, row_range[1]:] = False
        lse2, pos2 = _forward_lse(z, wd, scale32, present_u8, pi32, pj32, both_dir, nseg, row_range)
        per_row = lse2[:, 0, :] - pos2
        if both_dir:
            per_row = per_row + (lse2[:, 1, :] - pos2)
        per_row = torch.where(rows_valid, per_row, torch.zeros_like(per_row))
        denom = (2 * n if both_dir else n).to(torch.float32)
        loss = torch.where(n > 0, per_row.sum(1) * _LN2 / denom.clamp_min(1), torch.zeros_like(denom))
        ctx.save_for_backward(z, wd, scale32, present_u8, pi32, pj32, valid, lse2)
        ctx.meta = (both_dir, nseg, row_range, w is not None, scale.dtype, scale.shape, scale.device)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z, w, scale32, present_u8, pi32, pj32, valid, lse2 = ctx.saved_tensors
        both_dir, nseg, row_range, has_w, scale_dtype, scale_shape, scale_device = ctx.meta
        n = valid.sum(1)
        denom = (2 * n if both_dir else n).to(torch.float32)
        coef = torch.where(n > 0, grad_loss.to(torch.float32) / denom.clamp_min(1),
                           torch.zeros_like(denom)).contiguous()
        need_dw = has_w and ctx.needs_input_grad[1]
        dz, dw, ds = _backward(z, w, scale32, present_u8, pi32, pj32, lse2.contiguous(), coef, both_dir, nseg,
                               row_range, need_dw)
        gz = dz.to(z.dtype) if ctx.needs_input_grad[0] else None
        gs = ds.to(device=scale_device, dtype=scale_dtype).reshape(scale_shape) if ctx.needs_input_grad[2] else None
        return gz, dw, gs, None, None, None, None, None, None, None


def _pad_d(z: torch.Tensor) -> torch.Tensor:
    """z with its last dimension zero-padded to a multiple of _D_ALIGN (differentiable; a copy only then)."""
    pad = -z.shape[-1] % _D_ALIGN
    return torch.nn.functional.pad(z, (0, pad)) if pad else z


def _as_scale(logit_scale, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), device=ref.device, dtype=torch.float32)


def contrastive(z, present, logit_scale, row_weights, form, row_range=None):
    """[M, M] pair losses of docs/contract.md §4 (upper triangle, exactly 0 elsewhere).

    row_range=(start, stop): only the loss terms of the rows of samples start..stop-1 (both
    sides), against every column, over the global normaliser; row_weights is then
    [stop - start, M, M].  Summing over a partition of [0, B) gives the full losses.
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    M, B, D = z.shape
    scale = _as_scale(logit_scale, z)
    out = torch.zeros((M, M), device=z.device, dtype=torch.float32)
    if M < 2:
        return out
    if row_range is not None:
        row_range = (int(row_range[0]), int(row_range[1]))
        if row_range[1] <= row_range[0]:
            return out
    z = _pad_d(z)
    if z.stride(-1) != 1:
        z = z.contiguous()
    pi32, pj32, pi, pj = _pairs(M, z.device)
    present = present.to(torch.bool)
    valid = present[pi] & present[pj]  # [P, B]
    present_u8 = present.contiguous().view(torch.uint8)
    w = None
    if row_weights is not None:
        wl = row_weights[:, pi, pj].t().to(torch.float32)  # [P, rows], differentiable
        if row_range is not None:
            wl = torch.nn.functional.pad(wl, (row_range[0], B - row_range[1]))
        w = wl.contiguous()
    both, nseg = (True, 2) if form == "ntxent" else (True, 1)
    if B == 0:  # nothing to compute; keep the graph so that gradients are zeros
        loss = valid.sum(1).to(torch.float32) * (0.0 * z.sum() + 0.0 * scale.sum())
        return out.index_put((pi, pj), loss)
    loss = _PairLossFn.apply(z, w, scale, present_u8, pi32, pj32, valid, both, nseg, row_range)
    return out.index_put((pi, pj), loss)


def info_nce(a, b, row_weights, scale):
    """mean_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_n), one direction (the "nce" task)."""
    N, F = a.shape
    s = _as_scale(scale, a)
    if N == 0:
        return (a.sum() + b.sum()).to(torch.float32) * 0.0
    dtype = torch.promote_types(a.dtype, b.dtype)
    z = _pad_d(torch.stack([a.to(dtype), b.to(dtype)], 0))
    pi32, pj32, pi, pj = _pairs(2, a.device)
    present = torch.ones((2, N), device=a.device, dtype=torch.bool)
    valid = torch.ones((1, N), device=a.device, dtype=torch.bool)
    w = None if row_weights is None else row_weights.reshape(1, N).to(torch.float32).contiguous()
    loss = _PairLossFn.apply(z, w, s, present.view(torch.uint8), pi32, pj32, valid, False, 1, None)
    return loss[0]
