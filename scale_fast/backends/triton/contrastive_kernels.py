"""Triton kernels of the SCALE pair contrastive losses (docs/contract.md §4): their autotune configurations
and the jit kernels, the forward sweep, its exact online-max fallback and the backward dG tiles.

The launches, the buffers they fill and the autograd Function are in contrastive.py (design and bounds
there and in docs/triton_kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted

_INTERPRET = interpreted()


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
