"""Triton SCALE pair contrastive losses (docs/contract.md §4) and one-direction InfoNCE: the launches and autograd.

``contrastive(z, present, logit_scale, row_weights, form, row_range=None)`` -> [M, M] pair losses
``info_nce(a, b, row_weights, scale)`` -> 0-dim loss (one direction of "clip")

The jit kernels and their autotune configurations are in contrastive_kernels.py; this module sizes
the grids and buffers, launches them and forms the gradients.

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

from .contrastive_kernels import _INTERPRET, _contrastive_dg_kernel, _contrastive_fwd_fallback_kernel, \
    _contrastive_fwd_kernel

ALLOW_TF32 = os.environ.get("SCALE_FAST_TF32", "0") == "1"

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FORMS = ("ntxent", "clip")
_UNIT = 128  # the column split is a multiple of every BLOCK
# D is zero-padded to a multiple of every BLOCK_D, so that no kernel variant masks the D loop (the
# masked variants spill on sm_90a; see benchmarks/kernel_report.py).  Padding leaves every dot intact.
_D_ALIGN = 16 if _INTERPRET else 64
_ASSUMED_SMS = 132  # H100 / H200 SXM; used where no CUDA device is there to ask


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
