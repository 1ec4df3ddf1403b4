"""The chunked linear cross-entropy loop (docs/contract.md §7), written once for the backends.

loss_n = CE(s_n * (hidden_n @ weight.T + bias), target_n).  The rows are walked in chunks:

1. one GEMM forms the chunk's raw logits ``hidden[rows] @ weight.T`` into ONE reused
   [rows, K] buffer (float32, or float64 for float64 inputs);
2. the backend's *row pass* adds the bias, computes each row's loss and log-sum-exp
   (max and sum of exponentials) and, when gradients are wanted, overwrites the row in
   place with G = d loss / d raw logits = (softmax * sum(q) - q) * s_n * c_n (q the
   one-hot or soft target, c_n the row's coefficient), plus the row's d scale and
   d soft-target;
3. two GEMMs use G: d hidden[rows] = G @ weight, d weight += G.T @ hidden[rows]; d bias
   += column sums of G.

For reductions "mean" and "sum" the gradient of the scalar loss waits only for one number,
grad_output, so it is formed during the forward (c_n = 1 / kept rows, or 1) and the
backward multiplies by grad_output: 3 GEMM passes in all.  Reduction "none" needs a
grad_output per row before d weight can be summed, so its backward runs the loop again
with c_n = grad_output[n] and the saved log-sum-exp (4 GEMM passes).  When no input needs a
gradient the loop forms logits and losses only.

Where the GEMM operands are 16-bit (CUDA), the row pass writes G in the operand dtype into
the first half of each row's float32 bytes (a row-strided view, which cuBLAS takes as a
leading dimension), so no second buffer is needed; d weight accumulates in float32 by
default (SCALE_FAST_LCE_WEIGHT_GRAD=input accumulates in the weight's dtype: half the
accumulator memory, one rounding per chunk).

A backend supplies an :class:`Engine`: its row pass, its chunk size, its GEMM operand
dtype, and whether it may read the kept-row count on the host (free on the CPU) to skip
ignored rows entirely; otherwise ignored rows stay in the chunks and the row pass gives
them zero loss and zero gradient without any host synchronisation.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .._normalize import accumulation_dtype


def chunk_rows(n: int, k: int, h: int, max_bytes: float, itemsize: int = 4, min_rows: int = 1) -> int:
    """Rows per chunk: the power of two at or above N / ceil(K / H) (the chunk's logits about
    the size of hidden), halved while the [rows, K] buffer exceeds max_bytes; never under
    min_rows (d weight is read and written once per chunk: below that the GEMMs wait on memory,
    as with a large vocabulary and few rows); at most N."""
    rows = 1 << max(0, (-(-n // max(1, -(-k // max(h, 1)))) - 1).bit_length())
    while rows > min_rows and rows * k * itemsize > max_bytes:
        rows //= 2
    return max(1, min(max(rows, min_rows), n))


def weight_grad_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 (float64 for float64) accumulation of d weight, or the weight's own dtype when
    SCALE_FAST_LCE_WEIGHT_GRAD=input (read at every call)."""
    mode = os.environ.get("SCALE_FAST_LCE_WEIGHT_GRAD", "fp32").strip().lower()
    if mode not in ("fp32", "input"):
        raise ValueError(f"SCALE_FAST_LCE_WEIGHT_GRAD must be 'fp32' or 'input', got {mode!r}")
    return weight.dtype if mode == "input" else accumulation_dtype(weight.dtype)


@dataclass(frozen=True)
class Engine:
    """What a backend plugs into the loop.

    row_pass(x, g, *, bias, scale, target, ignore_index, lse_in, coef, loss, lse, dscale, dtarget):
        x: [R, K] raw logits without bias (accumulation dtype), overwritten; g: None (no
        gradient) or the [R, K] view G goes to (x itself, or 16-bit half rows of x); bias [K]
        or None; scale, coef, lse_in: [R] or None; target: [R] ids or [R, K] probabilities;
        outputs loss, lse, dscale: [R] and dtarget: [R, K] (None where not wanted; loss and
        lse are None when lse_in is given).  Ignored rows: loss 0, G 0.
    rows_per_chunk(n, k, h, device) -> int
    operand_dtype(dtype, device) -> GEMM operand dtype
    host_count: may read the kept-row count on the host (CPU tensors only) to skip ignored rows.
    gemm_context() -> a context manager the loop runs in (e.g. the GEMMs' float32 precision).
    """
    row_pass: Callable
    rows_per_chunk: Callable[[int, int, int, torch.device], int]
    operand_dtype: Callable[[torch.dtype, torch.device], torch.dtype]
    host_count: bool
    gemm_context: Callable = contextlib.nullcontext


# CPU backends: upper bound of one chunk's [rows, K] logits buffer (the chunk is Liger's size
# below it), unless that leaves fewer than HOST_MIN_ROWS rows.  The GEMMs dominate the time;
# taller chunks run them a little faster (d weight is read and written once per chunk).  At
# K=151936, H=768, N=2048 (2 threads) chunks of 16 rows took 2.8x the time of 256 rows; 128
# rows are within 10% of it (a 74 MiB buffer there).
HOST_CHUNK_BYTES = 48 * 2 ** 20
HOST_MIN_ROWS = 128


def host_engine(row_pass: Callable) -> Engine:
    """The Engine of a CPU backend: chunks under HOST_CHUNK_BYTES but at least HOST_MIN_ROWS rows (read
    at every call), GEMMs in the accumulation dtype, kept rows counted on the host (free there) so
    ignored rows are skipped."""
    return Engine(row_pass=row_pass,
                  rows_per_chunk=lambda n, k, h, device: chunk_rows(n, k, h, HOST_CHUNK_BYTES,
                                                                     min_rows=HOST_MIN_ROWS),
                  operand_dtype=lambda dtype, device: accumulation_dtype(dtype),
                  host_count=True)


def contract_op(engine: Engine) -> Callable:
    """The backend contract's linear_cross_entropy (scale_fast/_dispatch.py) on `engine`."""
    def linear_cross_entropy(hidden, weight, target, bias, scale, ignore_index, reduction):
        return LinearCrossEntropy.apply(engine, hidden, weight, bias, scale, target, int(ignore_index), reduction)
    return linear_cross_entropy


_OUT_DTYPE_MM: dict = {}


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, out possibly wider than a, b (fp32 accumulation of 16-bit products)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif out.device.type == "cuda":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # no mixed-dtype GEMM on the CPU: the same products, upcast first
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc possibly wider than a, b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        key = acc.device.type
        if _OUT_DTYPE_MM.get(key, True):
            try:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                _OUT_DTYPE_MM[key] = True
                return
            except (TypeError, RuntimeError, NotImplementedError):
                _OUT_DTYPE_MM[key] = False
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
        return
    if acc.dtype.itemsize >= a.dtype.itemsize:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:  # accumulate in a narrower dtype than the operands (SCALE_FAST_LCE_WEIGHT_GRAD=input)
        acc.add_(torch.mm(a, b))


def _grad_view(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where G goes: x itself, or the first half of each row's bytes read as a 16-bit [R, K]."""
    if dtype == x.dtype:
        return x
    r, k = x.shape
    return x.view(dtype)[:, :k]


def sweep(engine: Engine, hidden, weight, bias, scale, target, ignore_index, *, coef=None, lse_in=None,
          needs=(False,) * 5, rows=None):
    """One pass over the row chunks.

    coef [N] (None: no gradients) weights each row's loss; lse_in [N] a saved log-sum-exp (the
    losses are then not recomputed); needs: gradients wanted for (hidden, weight, bias, scale,
    target); rows: None (all rows) or the kept rows' indices (host_count engines only).
    Returns (losses [N] or None, lse [N], [d hidden, d weight, d bias, d scale, d target]),
    the gradients in the accumulation dtype (d hidden in the GEMM operand dtype, d weight in
    weight_grad_dtype), None where not wanted.
    """
    n, h_dim = hidden.shape
    k = weight.shape[0]
    dev = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    op = engine.operand_dtype(hidden.dtype, dev)
    soft = target.is_floating_point()
    w = weight.to(op)
    bias = None if bias is None else bias.to(acc).contiguous()
    scale = None if scale is None else scale.to(acc).contiguous()
    grads = coef is not None
    need_h, need_w, need_b, need_s, need_t = (grads and bool(x) for x in needs)
    need_b, need_s, need_t = need_b and bias is not None, need_s and scale is not None, need_t and soft
    zeros = torch.zeros if rows is not None else torch.empty  # skipped rows keep 0
    total = n if rows is None else rows.numel()
    f = dict(dtype=acc, device=dev)
    losses = torch.zeros(n, **f) if lse_in is None else None
    lse = torch.zeros(n, **f) if lse_in is None else lse_in
    dh = zeros(n, h_dim, dtype=op, device=dev) if need_h else None
    dw_dtype = weight_grad_dtype(weight)
    # the first chunk writes d weight (no zero fill, no read of zeros: with few rows and a large
    # K x H the d weight passes, not the GEMM arithmetic, set the time); accumulating kinds add up
    dw_written = need_w and total > 0 and dw_dtype == op
    dw = (torch.empty if dw_written else torch.zeros)(k, h_dim, dtype=dw_dtype, device=dev) if need_w else None
    db = torch.zeros(k, **f) if need_b else None
    ds = torch.zeros(n, **f) if need_s else None
    dt = zeros(n, k, **f) if need_t else None

    step = engine.rows_per_chunk(total, k, h_dim, dev) if total else 1
    buf = torch.empty(min(step, total) * k, **f) if total else None
    with engine.gemm_context():
        _chunks(engine, hidden, w, bias, scale, target, ignore_index, coef, lse_in, rows, buf, step, total, op,
                losses, lse, dh, dw, dw_written, db, ds, dt)
    return losses, lse, [dh, dw, db, ds, dt]


def _chunks(engine, hidden, w, bias, scale, target, ignore_index, coef, lse_in, rows, buf, step, total, op,
            losses, lse, dh, dw, dw_written, db, ds, dt):
    k = w.shape[0]
    grads = coef is not None
    for r0 in range(0, total, step):
        r1 = min(total, r0 + step)
        if rows is None:
            take = lambda t, a=r0, b=r1: None if t is None else t[a:b]  # noqa: E731
            put = None
        else:
            idx = rows[r0:r1]
            take = lambda t, i=idx: None if t is None else t.index_select(0, i)  # noqa: E731
            put = lambda dst, src, i=idx: None if dst is None else dst.index_copy_(0, i, src)  # noqa: E731
        h = take(hidden).to(op)
        x = buf[: (r1 - r0) * k].view(r1 - r0, k)
        _mm(h, w.T, x)
        g = _grad_view(x, op) if grads else None
        outs = [take(t) if put is None else (None if t is None else t.new_empty((r1 - r0,) + t.shape[1:]))
                for t in (losses, None if lse_in is not None else lse, ds, dt)]
        engine.row_pass(x, g, bias=bias, scale=take(scale), target=take(target), ignore_index=ignore_index,
                        lse_in=take(lse_in), coef=take(coef), loss=outs[0], lse=outs[1], dscale=outs[2],
                        dtarget=outs[3])
        if put is not None:
            for dst, src in zip((losses, None if lse_in is not None else lse, ds, dt), outs):
                put(dst, src)
        if not grads:
            continue
        if db is not None:
            db.add_(g.sum(0, dtype=db.dtype))
        if dh is not None:
            if put is None:
                _mm(g, w, dh[r0:r1])
            else:
                put(dh, torch.mm(g, w))
        if dw is not None:
            if dw_written and r0 == 0:
                torch.mm(g.T, h, out=dw)
            else:
                _addmm_(dw, g.T, h)


def kept_rows(engine: Engine, target: torch.Tensor, ignore_index: int):
    """The kept rows' indices when the engine may count them on the host and some are ignored."""
    if not engine.host_count or target.device.type != "cpu" or target.is_floating_point():
        return None
    keep = target != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


class LinearCrossEntropy(torch.autograd.Function):
    """The autograd op over :func:`sweep`; the engine is the first (non-tensor) argument."""

    @staticmethod
    def forward(ctx, engine, hidden, weight, bias, scale, target, ignore_index, reduction):
        acc = accumulation_dtype(hidden.dtype)
        n = hidden.shape[0]
        soft = target.is_floating_point()
        needs = tuple(ctx.needs_input_grad[1:6])
        if soft:
            count = torch.full((), float(n), dtype=acc, device=hidden.device)
        else:  # stays on the device: no host synchronisation
            count = (target != ignore_index).sum().to(acc)
        factor = 1.0 / count.clamp(min=1) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
        eager = reduction != "none" and any(needs)
        rows = kept_rows(engine, target, ignore_index)
        coef = factor.expand(n).contiguous() if eager else None
        losses, lse, grads = sweep(engine, hidden, weight, bias, scale, target, ignore_index, coef=coef,
                                   needs=needs, rows=rows)
        out = losses if reduction == "none" else losses.sum() * factor
        dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                  None if scale is None else scale.dtype, target.dtype)
        # the eager gradients leave the accumulators now: what waits for backward is input-sized
        ctx.grads = [None if t is None else t.to(d) for t, d in zip(grads, dtypes)] if eager else None
        ctx.engine, ctx.ignore_index, ctx.reduction, ctx.factor, ctx.dtypes = (engine, ignore_index, reduction,
                                                                                factor, dtypes)
        if any(needs):  # references (plus lse [N]) for a recomputing backward
            ctx.save_for_backward(hidden, weight, bias, scale, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, scale, target, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:6]
        g = grad_out.to(lse.dtype)
        grads, ctx.grads = ctx.grads, None  # handed over to autograd; a second backward recomputes
        if grads is None:
            n = hidden.shape[0]
            none = ctx.reduction == "none"
            # "none": the per-row grad_output and the saved lse; "mean"/"sum": the forward's own
            # computation again, so that a second backward gives the same bits as the first
            coef = g.contiguous() if none else ctx.factor.expand(n).contiguous()
            _, _, grads = sweep(ctx.engine, hidden, weight, bias, scale, target, ctx.ignore_index, coef=coef,
                                lse_in=lse if none else None, needs=needs,
                                rows=kept_rows(ctx.engine, target, ctx.ignore_index))
            grads = [None if t is None else t.to(d) for t, d in zip(grads, ctx.dtypes)]
        # formed for grad_output = 1; on the CPU (no device sync) a grad_output of exactly 1, as from
        # loss.backward(), skips the pass over every gradient (d weight: K x H)
        if ctx.reduction != "none" and not (g.device.type == "cpu" and bool(g == 1)):
            grads = [None if t is None else t.mul_(g) for t in grads]
        grads = [t if need else None for t, need in zip(grads, needs)]
        return (None, *grads, None, None)
