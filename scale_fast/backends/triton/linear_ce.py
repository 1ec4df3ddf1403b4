"""Fused linear cross-entropy in Triton (the "triton" backend of ``linear_cross_entropy``).

Computes ``F.cross_entropy(scale[:, None] * (hidden @ weight.T + bias), target)``
(contract in ``scale_fast/_dispatch.py``, docs/contract.md §7) without storing the
[N, K] logits: the forward keeps O(N) per-row values; the backward either keeps
nothing of size K per row (fused) or one bounded block of rows of the logit
gradient (chunked, the default).

Forward (``_lce_fwd_kernel``), grid (row blocks, vocabulary splits)
------------------------------------------------------------------
Each program takes BLOCK_N rows and one contiguous slice of the vocabulary,
walks it in BLOCK_K tiles, forms each [BLOCK_N, BLOCK_K] logit tile with
``tl.dot`` over BLOCK_H slices of H (fp32 accumulation) and keeps an online
log-sum-exp in fp32; hard targets also pick the target logit, soft targets
accumulate sum_k q_k z_k and sum_k q_k.  Partials [SPLIT, N] are merged by a
few O(N * SPLIT) torch ops into per-row lse and loss.  The split keeps all SMs
busy for small N; programs of one split walk the same weight tiles together,
so the weight comes from HBM about once and from L2 afterwards.

Backward (``_lce_bwd_kernel``): recompute, then two products
------------------------------------------------------------
One program per [BLOCK_N, BLOCK_K] logit tile (grouped launch order for L2
reuse) recomputes the tile from hidden/weight and the saved lse, and forms
G = c_n * (softmax * sum(q) - q) * s_n (c_n = grad_output times the mean factor,
0 on ignored rows).  dscale_n = sum_k G_unscaled * raw_logit and dbias = column
sums of G are fp32 atomics (O(N + K) of them); d target (soft targets)
= c_n * (lse_n - z_nk) is written tile by tile.  dH = G @ W and dW = G^T @ H
are then formed in one of two ways (``SCALE_FAST_LCE_BACKWARD``, read at every
call):

* ``chunked`` (default): for blocks of rows whose G fits in
  ``SCALE_FAST_LCE_CHUNK_MB`` (default 256 MiB; the buffer never grows with N),
  the kernel stores G in the input dtype and cuBLAS forms dH[rows] = G @ W and
  dW += G^T @ H[rows], dW accumulated in fp32 (``addmm(out_dtype=float32)``),
  cast at the end.  Deterministic.
* ``fused``: no G buffer at all; inside the tile kernel, per BLOCK_HP slice of
  H, dH[rows] += G @ W[tile] and dW[tile] += G^T @ H[rows] are fp32 atomics
  (``sem="relaxed"``, vectorised) into fp32 accumulators; each program starts
  at a different H slice so that concurrent programs rarely add to the same
  addresses.  Least memory; summation order (fp32 rounding) varies run to run.

Why not "a second kernel looping over row blocks per vocabulary block" for dW:
with H = 768 neither dH[rows, :] nor dW[tile, :] fits in registers across its
reduction loop (128 x 768 fp32 = 384 KiB), so such a kernel accumulates through
L2 anyway (a read-modify-write, twice the bytes of an atomic add) and pays a
4th GEMM for the extra recompute.  Measured on an H100 (torch 2.11, triton
3.6), N=16384, K=21128, H=768, bf16, forward + backward: fused atomic 8.5 ms
(backward 6.9 ms, of which the atomics cost ~1 ms over plain stores: the
in-kernel products run at ~260 TFLOP/s), chunked 4.7 ms with 256 MiB (5.0 ms
with 128 MiB), plain torch with materialized logits 7.2 ms and 4.2 GiB extra;
peak extra memory 390 MiB fused, 660 MiB chunked-256, 530 MiB chunked-128.
The chunked backward does 3 GEMMs (recompute in Triton + 2 in cuBLAS at ~650
TFLOP/s), which is why it is the default.

Numerics and options
--------------------
* bf16/fp16 inputs: tl.dot on the input dtype with fp32 accumulation; G is cast
  to the input dtype for the two gradient products (as cuBLAS-based peers do).
* float32 inputs: exact float32 products (``input_precision="ieee"``, and no
  TF32 in the chunked backward's cuBLAS calls) by default.  Set the
  environment variable ``SCALE_FAST_TF32=1`` (read at every call) to use TF32
  tensor cores instead (about 10 significant bits per product).
* float64 inputs have no kernels: the dispatcher runs the torch backend for them.
* All index arithmetic that can exceed 2^31 (row * H, vocab * H, row * K) is
  int64.  Any N, H, K work (masks); "mean" over zero non-ignored rows is 0.
* No host synchronisation: the non-ignored row count is a device tensor, and
  the chunking depends on shapes only.
* On CUDA the kernels are autotuned over a small fixed set of H100 configs,
  keyed on (N bucket, K, H, flags, dtypes); ``SCALE_FAST_LCE_AUTOTUNE=0`` (read
  at import) uses the first config of each set.  Under ``TRITON_INTERPRET=1``
  (CPU tests) a single small config is used.
* ``benchmarks/compile_check_linear_ce.py`` compiles every kernel variant for
  sm_90 without a GPU, and with ``--gpu`` checks and times them on one.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["linear_cross_entropy"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_tf32() -> bool:
    return os.environ.get("SCALE_FAST_TF32", "0").strip() == "1"


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _logit_tile(h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_hn, stride_wk,
                PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32 tile of hidden[rows] @ weight[cols].T (masked entries are 0)."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        h_mask = hh < H
        x = tl.load(h_ptr + rows64[:, None] * stride_hn + hh[None, :],
                    mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wk + hh[None, :],
                    mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if DOT_F32:  # interpreter only: its tl.dot multiplies the raw bits of bf16
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, s_ptr, t_ptr,
    m_ptr, l_ptr, a_ptr, q_ptr,
    N, K, H, CHUNK, ignore_index,
    stride_hn, stride_wk, stride_tn,
    N_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SOFT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per (row block, vocabulary split): running max m, sum exp(z - m), and
    a = target logit (hard) or sum_k q_k z_k (soft), q = sum_k q_k (soft).
    Partials are stored at [split, row] in fp32 buffers of shape [SPLIT, N]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if HAS_SCALE:
        sc = tl.load(s_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
    if not SOFT:
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)

    k_start = pid_s * CHUNK
    k_end = tl.minimum(k_start + CHUNK, K)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k
        col_mask = cols < k_end
        cols64 = cols.to(tl.int64)
        z = _logit_tile(h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_hn, stride_wk,
                        PRECISION, DOT_F32, BLOCK_N, BLOCK_K, BLOCK_H)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            z = z + bias[None, :]
        if HAS_SCALE:
            z = z * sc[:, None]
        # every tile has at least one valid column, so the row max is finite
        z_m = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_m, axis=1))
        p = tl.exp(z_m - m_new[:, None])
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, axis=1)
        m_i = m_new
        if SOFT:
            mask2 = row_mask[:, None] & col_mask[None, :]
            q = tl.load(t_ptr + rows64[:, None] * stride_tn + cols64[None, :], mask=mask2,
                        other=0.0).to(tl.float32)
            a_i += tl.sum(q * z, axis=1)  # q is 0 on masked entries, z finite there
            q_i += tl.sum(q, axis=1)
        else:
            hit = (cols64[None, :] == tgt[:, None]) & col_mask[None, :]
            a_i += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + rows64
    tl.store(m_ptr + out, m_i, mask=row_mask)
    tl.store(l_ptr + out, l_i, mask=row_mask)
    tl.store(a_ptr + out, a_i, mask=row_mask)
    if SOFT:
        tl.store(q_ptr + out, q_i, mask=row_mask)


@triton.jit
def _lce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, s_ptr, t_ptr, lse_ptr, qs_ptr, c_ptr,
    dh_ptr, dw_ptr, db_ptr, ds_ptr, dt_ptr, g_ptr,
    N, K, H, ignore_index,
    stride_hn, stride_wk, stride_tn, stride_dtn, stride_gn,
    N_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SOFT: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr, STORE_G: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HP: tl.constexpr,
    GROUP_N: tl.constexpr,
    ATOMIC: tl.constexpr = True,
):
    """One [BLOCK_N, BLOCK_K] logit tile: recompute, G, and atomic gradient updates.

    dh [N, H], dw [K, H], db [K], ds [N] are fp32 accumulators (zeroed before
    the launch); dt [N, K] (soft targets) is written directly.  STORE_G writes
    d loss / d raw logit (input dtype) to g [N, K] instead (the chunked
    backward, NEED_DH = NEED_DW = False).  BLOCK_HP is the H block of the two
    gradient products.  ATOMIC=False (benchmarks only, wrong results) replaces
    the dH/dW atomics by plain stores to measure what the atomics cost."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    # grouped order: GROUP_N row blocks x all vocabulary tiles, row block fastest
    num_in_group = GROUP_N * num_pid_k
    group_id = pid // num_in_group
    first_n = group_id * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % num_in_group) % group_size
    pid_k = (pid % num_in_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    cols64 = cols.to(tl.int64)
    mask2 = row_mask[:, None] & col_mask[None, :]
    offs_h = tl.arange(0, BLOCK_H)

    raw = _logit_tile(h_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_hn, stride_wk,
                      PRECISION, DOT_F32, BLOCK_N, BLOCK_K, BLOCK_H)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        raw = raw + bias[None, :]
    if HAS_SCALE:
        sc = tl.load(s_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
        z = raw * sc[:, None]
    else:
        z = raw
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    if SOFT:
        qsum = tl.load(qs_ptr + rows, mask=row_mask, other=0.0)
        q = tl.load(t_ptr + rows64[:, None] * stride_tn + cols64[None, :], mask=mask2,
                    other=0.0).to(tl.float32)
        gz = (p * qsum[:, None] - q) * c[:, None]
    else:
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        onehot = tl.where(cols64[None, :] == tgt[:, None], 1.0, 0.0)
        gz = (p - onehot) * c[:, None]  # c is 0 on ignored rows
    gz = tl.where(mask2, gz, 0.0)  # d loss / d scaled logit

    if NEED_DT:
        dt = (lse[:, None] - z) * c[:, None]
        tl.store(dt_ptr + rows64[:, None] * stride_dtn + cols64[None, :],
                 dt.to(dt_ptr.dtype.element_ty), mask=mask2)
    if NEED_DS:
        tl.atomic_add(ds_ptr + rows, tl.sum(gz * raw, axis=1), mask=row_mask, sem="relaxed")
    if HAS_SCALE:
        gr = gz * sc[:, None]  # d loss / d raw logit
    else:
        gr = gz
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(gr, axis=0), mask=col_mask, sem="relaxed")

    if NEED_DH or NEED_DW or STORE_G:
        g = gr.to(h_ptr.dtype.element_ty)
        if STORE_G:
            tl.store(g_ptr + rows64[:, None] * stride_gn + cols64[None, :], g, mask=mask2)
        if DOT_F32:
            g = g.to(tl.float32)
    # Two separate loops over H keep one product accumulator alive at a time.  Each program
    # starts at a different H block (programs that run together share rows or vocabulary
    # tiles), so that their atomics rarely hit the same addresses at the same time.
    offs_hp = tl.arange(0, BLOCK_HP)
    n_hp = tl.cdiv(H, BLOCK_HP)
    if NEED_DH:
        for i in range(0, n_hp):
            hh = ((i + pid_k) % n_hp) * BLOCK_HP + offs_hp
            h_mask = hh < H
            w = tl.load(w_ptr + cols64[:, None] * stride_wk + hh[None, :],
                        mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            if DOT_F32:
                w = w.to(tl.float32)
            dh = tl.dot(g, w, input_precision=PRECISION)
            dh_ptrs = dh_ptr + rows64[:, None] * H + hh.to(tl.int64)[None, :]
            if ATOMIC:
                tl.atomic_add(dh_ptrs, dh, mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
            else:
                tl.store(dh_ptrs, dh, mask=row_mask[:, None] & h_mask[None, :])
    if NEED_DW:
        gt = tl.trans(g)
        for i in range(0, n_hp):
            hh = ((i + pid_n) % n_hp) * BLOCK_HP + offs_hp
            h_mask = hh < H
            x = tl.load(h_ptr + rows64[:, None] * stride_hn + hh[None, :],
                        mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            dw = tl.dot(gt, x, input_precision=PRECISION)
            dw_ptrs = dw_ptr + cols64[:, None] * H + hh.to(tl.int64)[None, :]
            if ATOMIC:
                tl.atomic_add(dw_ptrs, dw, mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")
            else:
                tl.store(dw_ptrs, dw, mask=col_mask[:, None] & h_mask[None, :])


# --------------------------------------------------------------------------- #
# launch configurations
# --------------------------------------------------------------------------- #
def _zero_accumulators(nargs):
    for name in ("dh_ptr", "dw_ptr", "db_ptr", "ds_ptr"):
        t = nargs.get(name)
        if isinstance(t, torch.Tensor):
            t.zero_()


def _config_class(nargs, kwargs) -> str:
    """Which config set fits a call: 16-bit tensor-core tiles, smaller tiles when a soft-target
    tile is also live, TF32, or exact fp32 (FMA dots: small tiles)."""
    soft = bool(kwargs.get("SOFT", nargs.get("SOFT", False)))
    prec = kwargs.get("PRECISION", nargs.get("PRECISION", "ieee"))
    if nargs["h_ptr"].dtype in (torch.bfloat16, torch.float16):
        return "soft16" if soft else "mma16"
    return "tf32" if prec == "tf32" else "ieee"


def _make_configs(sets: dict, bwd: bool):
    """rows: (BLOCK_N, BLOCK_K, BLOCK_H, num_warps, num_stages[, BLOCK_HP])."""
    out = {}
    for cls, rows in sets.items():
        out[cls] = []
        for row in rows:
            bn, bk, bh, w, st = row[:5]
            kw = {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_H": bh}
            if bwd:
                kw.update(BLOCK_HP=row[5] if len(row) > 5 else bh, GROUP_N=8)
            out[cls].append(triton.Config(kw, num_warps=w, num_stages=st,
                                          pre_hook=_zero_accumulators if bwd else None))
    return out


def _pruner(sets: dict):
    def prune(configs, nargs, **kwargs):
        chosen = sets[_config_class(nargs, kwargs)]
        return [c for c in configs if c in chosen] or list(configs[:1])

    return prune


if _INTERPRET:
    _FWD_SETS = _make_configs({"all": [(16, 16, 16, 1, 1)]}, bwd=False)
    _BWD_SETS = _make_configs({"all": [(16, 16, 16, 1, 1, 32)]}, bwd=True)
    _CHUNK_ALIGN = 16  # vocabulary split boundaries: a multiple of every BLOCK_K
else:
    # (BLOCK_N, BLOCK_K, BLOCK_H, num_warps, num_stages[, BLOCK_HP]), H100 (sm_90, wgmma); the first of each
    # set is the default when autotuning is off.  Shapes whose registers or shared memory did not
    # fit (spills, > 227 KiB) were dropped (benchmarks/compile_check_linear_ce.py reports them), and
    # so were the slowest on an H100 at N=16384, K=21128, H=768 (fwd 128x64: 2.1 ms vs 1.44 ms).
    _FWD_SETS = _make_configs({
        "mma16": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2)],
        "soft16": [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
        "tf32": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
        "ieee": [(64, 64, 32, 4, 2), (64, 32, 32, 4, 2)],
    }, bwd=False)
    _BWD_SETS = _make_configs({
        "mma16": [(128, 128, 64, 8, 3, 128), (128, 128, 64, 8, 3, 64), (64, 128, 64, 4, 3, 64)],
        "soft16": [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
        "tf32": [(64, 64, 32, 4, 3), (64, 128, 32, 4, 2)],
        "ieee": [(64, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    }, bwd=True)
    _CHUNK_ALIGN = 256

if os.environ.get("SCALE_FAST_LCE_AUTOTUNE", "1").strip() == "0":  # first config of each set only
    _FWD_SETS = {k: v[:1] for k, v in _FWD_SETS.items()}
    _BWD_SETS = {k: v[:1] for k, v in _BWD_SETS.items()}
_FWD_CONFIGS = [c for v in _FWD_SETS.values() for c in v]
_BWD_CONFIGS = [c for v in _BWD_SETS.values() for c in v]

_KEY = ["N_BUCKET", "K", "H", "HAS_BIAS", "HAS_SCALE", "SOFT", "PRECISION"]
_lce_fwd = triton.autotune(configs=_FWD_CONFIGS, key=_KEY,
                           prune_configs_by={"early_config_prune": _pruner(_FWD_SETS)})(_lce_fwd_kernel)
_lce_bwd = triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["NEED_DH", "NEED_DW", "STORE_G"],
                           prune_configs_by={"early_config_prune": _pruner(_BWD_SETS)})(_lce_bwd_kernel)


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _vocab_split(n: int, k: int, device: torch.device):
    """(number of splits, split length): enough programs to fill the GPU, long splits."""
    if _INTERPRET:
        want = max(1, min(4, triton.cdiv(k, 32)))  # exercise the split merge in CPU tests
    else:
        row_blocks = triton.cdiv(n, 128)
        want = max(1, min(triton.cdiv(2 * _num_sms(device), row_blocks), triton.cdiv(k, 1024)))
    chunk = triton.cdiv(triton.cdiv(k, want), _CHUNK_ALIGN) * _CHUNK_ALIGN
    return triton.cdiv(k, chunk), chunk


def _n_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _dot_f32(hidden: torch.Tensor) -> bool:
    """Under the interpreter, bf16 dot operands are upcast (its tl.dot is wrong for bf16)."""
    return _INTERPRET and hidden.dtype == torch.bfloat16


_DUMMY: dict = {}


def _dummy(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _DUMMY[key]


# --------------------------------------------------------------------------- #
# autograd
# --------------------------------------------------------------------------- #
class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, target, ignore_index, reduction):
        N, H = hidden.shape
        K = weight.shape[0]
        dev = hidden.device
        soft = target.is_floating_point()
        precision = "tf32" if (_use_tf32() and hidden.dtype == torch.float32) else "ieee"
        dummy = _dummy(dev)
        split, chunk = _vocab_split(N, K, dev)
        m_part = torch.empty(split, N, dtype=torch.float32, device=dev)
        l_part = torch.empty_like(m_part)
        a_part = torch.empty_like(m_part)
        q_part = torch.empty_like(m_part) if soft else dummy
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
        _lce_fwd[grid](
            hidden, weight, bias if bias is not None else dummy, scale if scale is not None else dummy, target,
            m_part, l_part, a_part, q_part,
            N, K, H, chunk, ignore_index,
            hidden.stride(0), weight.stride(0), target.stride(0) if soft else 1,
            _n_bucket(N),
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, SOFT=soft, PRECISION=precision,
            DOT_F32=_dot_f32(hidden),
        )
        if split == 1:
            lse = m_part[0] + torch.log(l_part[0])
            picked = a_part[0]
        else:
            m = m_part.max(dim=0).values
            lse = m + torch.log((l_part * torch.exp(m_part - m)).sum(dim=0))
            picked = a_part.sum(dim=0)
        if soft:
            qsum = q_part[0] if split == 1 else q_part.sum(dim=0)
            losses = qsum * lse - picked
            valid = None
            denom = torch.full((), float(N), dtype=torch.float32, device=dev)
        else:
            qsum = None
            valid = target != ignore_index
            losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
            denom = valid.sum().to(torch.float32)
        if reduction == "none":
            out = losses
        elif reduction == "sum":
            out = losses.sum()
        else:  # mean; 0 (not NaN) when every row is ignored (the sum is 0 then)
            out = losses.sum() / denom.clamp(min=1.0)

        ctx.save_for_backward(hidden, weight, bias, scale, target, lse, qsum, valid, denom)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.precision = precision
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, scale, target, lse, qsum, valid, denom = ctx.saved_tensors
        need_dh, need_dw, need_db, need_ds, need_dt = ctx.needs_input_grad[:5]
        need_db = need_db and bias is not None
        need_ds = need_ds and scale is not None
        soft = target.is_floating_point()
        need_dt = need_dt and soft
        if not (need_dh or need_dw or need_db or need_ds or need_dt):
            return None, None, None, None, None, None, None
        N, H = hidden.shape
        K = weight.shape[0]
        dev = hidden.device
        dummy = _dummy(dev)

        g = grad_out.to(torch.float32)
        if ctx.reduction == "mean":
            g = g / denom.clamp(min=1.0)
        c = g.expand(N) if g.dim() == 0 else g
        if valid is not None:
            c = torch.where(valid, c, torch.zeros_like(c))
        c = c.contiguous()

        f32 = dict(dtype=torch.float32, device=dev)
        db = torch.empty(K, **f32) if need_db else dummy
        ds = torch.empty(N, **f32) if need_ds else dummy
        dt = torch.empty(N, K, dtype=target.dtype, device=dev) if need_dt else dummy
        args = dict(bias=bias, scale=scale, target=target, lse=lse, qsum=qsum, c=c, ds=ds, dt=dt,
                    ignore_index=ctx.ignore_index, precision=ctx.precision, need_db=need_db, need_ds=need_ds,
                    need_dt=need_dt)
        chunk_rows = _chunk_rows(N, K, hidden) if (need_dh or need_dw) else 0
        if chunk_rows == 0:
            dh = torch.empty(N, H, **f32) if need_dh else dummy
            dw = torch.empty(K, H, **f32) if need_dw else dummy
            _launch_bwd(hidden, weight, dh=dh, dw=dw, db=db, g=None, **args)
            dh = dh.to(hidden.dtype) if need_dh else None
            dw = dw.to(weight.dtype) if need_dw else None
        else:  # chunked: G of a block of rows in a buffer, the two products by cuBLAS
            fp32_cuda = hidden.is_cuda and hidden.dtype == torch.float32
            tf32_prev = _set_cublas_tf32(ctx.precision == "tf32") if fp32_cuda else None
            try:
                dh, dw = _chunked_backward(hidden, weight, chunk_rows, args, db, need_dh, need_dw)
            finally:
                if tf32_prev is not None:
                    _set_cublas_tf32(tf32_prev)
        return (
            dh,
            dw,
            db.to(bias.dtype) if need_db else None,
            ds.to(scale.dtype) if need_ds else None,
            dt if need_dt else None,
            None,
            None,
        )


def _chunked_backward(hidden, weight, chunk_rows, args, db, need_dh, need_dw):
    """Per block of rows: the kernel writes G = d loss / d raw logits (input dtype) into a
    [chunk_rows, K] buffer, plus the dbias / dscale / dtarget parts; cuBLAS then forms
    dH[rows] = G @ W (fp32 accumulation inside the GEMM) and dW += G^T @ H[rows] into an
    fp32 accumulator.  Returns (dH, dW) in the input dtypes (None where not needed)."""
    N, H = hidden.shape
    K = weight.shape[0]
    dev = hidden.device
    dummy = _dummy(dev)
    need_db = args["need_db"]
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(K, H, dtype=torch.float32, device=dev) if need_dw else None
    db_part = torch.empty(K, dtype=torch.float32, device=dev) if need_db else dummy
    if need_db:
        db.zero_()
    g_buf = torch.empty(min(chunk_rows, N), K, dtype=hidden.dtype, device=dev)
    scale, qsum = args["scale"], args["qsum"]
    for r0 in range(0, N, chunk_rows):
        rows = slice(r0, min(N, r0 + chunk_rows))
        g = g_buf[: rows.stop - r0]
        part = dict(args, scale=scale[rows] if scale is not None else None, target=args["target"][rows],
                    lse=args["lse"][rows], qsum=qsum[rows] if qsum is not None else None, c=args["c"][rows],
                    ds=args["ds"][rows] if args["need_ds"] else dummy,
                    dt=args["dt"][rows] if args["need_dt"] else dummy)
        _launch_bwd(hidden[rows], weight, dh=dummy, dw=dummy, db=db_part, g=g, **part)
        if need_db:
            db += db_part
        if need_dh:
            torch.mm(g, weight, out=dh[rows])
        if need_dw:
            dw = _addmm_f32(dw, g.t(), hidden[rows])
    return dh, (dw.to(weight.dtype) if need_dw else None)


def _set_cublas_tf32(flag: bool):
    """Set torch's cuBLAS TF32 switch (float32 inputs of the chunked backward follow
    SCALE_FAST_TF32 like the kernels do); returns the previous value, None if it can't."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prev = bool(torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = bool(flag)
        return prev
    except Exception:  # pragma: no cover - a torch that refuses the legacy switch
        return None


def _launch_bwd(hidden, weight, *, bias, scale, target, lse, qsum, c, dh, dw, db, ds, dt, g, ignore_index,
                precision, need_db, need_ds, need_dt):
    """One launch of the backward tile kernel over hidden's rows (all of them, or one chunk)."""
    N, H = hidden.shape
    K = weight.shape[0]
    dummy = _dummy(hidden.device)
    soft = target.is_floating_point()
    need_dh, need_dw = dh is not dummy, dw is not dummy
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _lce_bwd[grid](
        hidden, weight, bias if bias is not None else dummy, scale if scale is not None else dummy, target,
        lse, qsum if qsum is not None else dummy, c,
        dh, dw, db, ds, dt, g if g is not None else dummy,
        N, K, H, ignore_index,
        hidden.stride(0), weight.stride(0), target.stride(0) if soft else 1, dt.stride(0) if need_dt else 1,
        g.stride(0) if g is not None else 1,
        _n_bucket(N),
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, SOFT=soft,
        NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, NEED_DS=need_ds, NEED_DT=need_dt,
        STORE_G=g is not None, PRECISION=precision, DOT_F32=_dot_f32(hidden),
    )


def _chunk_rows(N: int, K: int, hidden: torch.Tensor) -> int:
    """Rows per chunk of the chunked backward, or 0 for the fused (atomic) backward.

    SCALE_FAST_LCE_BACKWARD=fused|chunked picks the scheme (read at every call);
    SCALE_FAST_LCE_CHUNK_MB (default 256) bounds the gradient-of-logits buffer."""
    mode = os.environ.get("SCALE_FAST_LCE_BACKWARD", _DEFAULT_BACKWARD).strip().lower()
    if mode not in ("fused", "chunked"):
        raise ValueError(f"SCALE_FAST_LCE_BACKWARD must be 'fused' or 'chunked', got {mode!r}")
    if mode == "fused":
        return 0
    budget = float(os.environ.get("SCALE_FAST_LCE_CHUNK_MB", "256")) * 2 ** 20
    rows = int(budget // max(1, K * hidden.element_size()))
    rows = max(128, rows // 128 * 128) if not _INTERPRET else max(16, rows // 16 * 16)
    return min(rows, N)


_DEFAULT_BACKWARD = "chunked"
_ADDMM_OUT_DTYPE: dict = {}


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a @ b with fp32 accumulation for 16-bit a, b (cuBLAS, no fp32 copies)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    dev = acc.device.type
    if dev not in _ADDMM_OUT_DTYPE:
        try:
            torch.addmm(acc[:1, :1], a[:1, :1], b[:1, :1], out_dtype=torch.float32)
            _ADDMM_OUT_DTYPE[dev] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[dev] = False
    if _ADDMM_OUT_DTYPE[dev]:
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.add_(torch.mm(a, b).float())


def linear_cross_entropy(hidden, weight, target, bias=None, scale=None, ignore_index=-100, reduction="mean"):
    """Backend contract in ``scale_fast/_dispatch.py`` (fused Triton kernels; float64 is routed to the
    torch backend by the dispatcher, as the backend's record declares)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    N = hidden.shape[0]
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.full((N,), float(scale), dtype=torch.float32, device=hidden.device)
    elif scale is not None and scale.dim() == 0:
        scale = scale.expand(N)
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    out_dtype = torch.float32
    if N == 0 or weight.shape[0] == 0:
        zero = (hidden.sum() * 0.0 + weight.sum() * 0.0).to(out_dtype)
        return zero.expand(N) if reduction == "none" else zero
    hidden = hidden.to(dt).contiguous()
    weight = weight.to(dt).contiguous()
    bias = bias.contiguous() if bias is not None else None
    scale = scale.contiguous() if scale is not None else None
    target = target.contiguous()
    return _LinearCrossEntropy.apply(hidden, weight, bias, scale, target, int(ignore_index), reduction)
