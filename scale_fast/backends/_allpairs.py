"""The all-pairs contrastive driver (docs/contract.md §4) and the info-NCE op, shared by the backends.

Three layers, so that a backend writes only tile loops and a new loss form only its math:

* pair kernels, one record per loss family: ``PairKernels`` (the softmax forms) and
  ``SigLIPKernels`` (the sigmoid form), a backend's loops over the tiles of one pair's logits
  (e.g. scale_fast/backends/torch/contrastive.py and siglip.py);
* pair forms (``NTXent``, ``Clip`` on PairKernels, ``SigLIP`` on SigLIPKernels): how one pair's
  loss is built from the kernels, for all
  its rows (``forward``/``backward``) and for a block of its rows against every column
  (``rows_forward``/``rows_backward``, the row_range form; needs the row-block kernels);
* the driver (``all_pairs``): every active pair i < j in one autograd Function.  It saves
  only the raw embeddings e, the row indices and each form's O(n) statistics; a pair's
  rows are gathered and normalised again in backward and their gradient added straight
  into one de buffer.

A new form is a class with the methods of ``PairForm`` (``rows_*`` only for row_range),
added to the backend's ``forms`` mapping (``pair_forms``); the driver needs no change.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Optional, Protocol, Tuple, Union

import torch

from .._normalize import accumulation_dtype, normalize_rows_, normalize_rows_backward
from ._host_memory import release


@dataclass(frozen=True)
class PairKernels:
    """A backend's tile loops over one pair for the softmax (InfoNCE) forms NT-Xent and CLIP (rows
    already gathered and normalised, accumulation dtype).

    ntxent_forward(u, rs) -> (loss, lse, pos); ntxent_backward(u, rs, lse, pos, coef) -> (du, d_rs):
        NT-Xent of u = [a; b] (positives r <-> r + n, self excluded), rs = s * w per row of u.
    cross_forward(a, b, rs, both) -> (loss, lse_rows, lse_cols or None, pos);
    cross_backward(a, b, rs, lse_rows, lse_cols, pos, coef) -> (da, db, d_rs):
        InfoNCE of a against b (positives on the diagonal), both directions when ``both``.
    rows_forward(q, k, rs, pos, self_idx) -> (sum, lse, pos_dot);
    rows_backward(q, k, rs, lse, pos, self_idx, pos_dot, coef) -> (dq, dk, d_rs):
        the row-block form: sum over query rows q of LSE over every key row k minus the
        positive k[pos]; self_idx (or None) a column to exclude per row.  Optional.
    coef: a 0-dim tensor, the gradient of the returned loss.
    workspace() -> a context the driver holds around the pair loop of one call (forward, and
        backward): scratch the kernels keep in it is reused by the next pair rather than freed
        and faulted in again after the driver hands free pages back to the OS.
    """

    ntxent_forward: Callable
    ntxent_backward: Callable
    cross_forward: Callable
    cross_backward: Callable
    rows_forward: Optional[Callable] = None
    rows_backward: Optional[Callable] = None
    workspace: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class SigLIPKernels:
    """A backend's tile loops over one pair for the sigmoid (SigLIP) form (rows as in PairKernels).

    forward(q, k, rs, pos, bias) -> sum; backward(q, k, rs, pos, bias, coef) -> (dq, dk, d_rs, d_bias):
        the sigmoid loss sum_r sum_c softplus(-y_rc (rs_r q_r . k_c + bias)) of the query rows q
        against every key row k, y_rc = +1 where c == pos[r], else -1 (the row-block form too).
    workspace: as in PairKernels.
    """

    forward: Callable
    backward: Callable
    workspace: Callable[[], ContextManager] = contextlib.nullcontext


class PairForm(Protocol):
    """One pair's loss from its unit rows a, b [n, D] and row scales rs [n] (= s * w_b), on kernels k."""

    k: Union[PairKernels, SigLIPKernels]

    def forward(self, a, b, rs) -> Tuple[torch.Tensor, object]: ...

    def backward(self, a, b, rs, stats, coef) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    # row_range: only the loss terms of rows `local` (indices into a, b), against every column,
    # divided by the pair's full normaliser; rs holds the scales of those rows only.
    def rows_forward(self, a, b, rs, local) -> Tuple[torch.Tensor, object]: ...

    # columns_grad=False: the gradient of the rows `local` as queries only (the columns are constants)
    def rows_backward(self, a, b, rs, local, stats, coef, columns_grad=True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class NTXent:
    """NT-Xent of one pair: the 2n rows [a; b], each row's positive its partner, self excluded."""

    def __init__(self, kernels: PairKernels):
        self.k = kernels

    def forward(self, a, b, rs):
        loss, lse, pos = self.k.ntxent_forward(joined(a, b), torch.cat([rs, rs]))
        return loss, (lse, pos)

    def backward(self, a, b, rs, stats, coef):
        n = a.shape[0]
        du, d_rs = self.k.ntxent_backward(joined(a, b), torch.cat([rs, rs]), *stats, coef)
        return du[:n], du[n:], d_rs[:n] + d_rs[n:]

    @staticmethod
    def _queries(n, local):
        """(query rows of u = [a; b], their positive columns, their own columns to exclude)."""
        q_idx = torch.cat([local, local + n])
        return q_idx, torch.cat([local + n, local]), q_idx

    def rows_forward(self, a, b, rs, local):
        n = a.shape[0]
        q_idx, pos, self_idx = self._queries(n, local)
        u = joined(a, b)
        total, lse, pos_dot = self.k.rows_forward(u.index_select(0, q_idx), u, torch.cat([rs, rs]), pos, self_idx)
        return total / (2 * n), (lse, pos_dot)

    def rows_backward(self, a, b, rs, local, stats, coef, columns_grad=True):
        n = a.shape[0]
        q_idx, pos, self_idx = self._queries(n, local)
        lse, pos_dot = stats
        u = joined(a, b)
        dq, du, d_rs = self.k.rows_backward(u.index_select(0, q_idx), u, torch.cat([rs, rs]), lse, pos, self_idx,
                                            pos_dot, coef / (2 * n))
        if not columns_grad:
            du.zero_()
        du.index_add_(0, q_idx, dq)
        L = local.numel()
        return du[:n], du[n:], d_rs[:L] + d_rs[L:]


class Clip:
    """CLIP's symmetric InfoNCE of one pair: a -> b and b -> a, positives on the diagonal."""

    def __init__(self, kernels: PairKernels):
        self.k = kernels

    def forward(self, a, b, rs):
        loss, lse_r, lse_c, pos = self.k.cross_forward(a, b, rs, True)
        return loss, (lse_r, lse_c, pos)

    def backward(self, a, b, rs, stats, coef):
        return self.k.cross_backward(a, b, rs, *stats, coef)

    def rows_forward(self, a, b, rs, local):
        n = a.shape[0]
        s1, lse1, pd1 = self.k.rows_forward(a.index_select(0, local), b, rs, local, None)
        s2, lse2, pd2 = self.k.rows_forward(b.index_select(0, local), a, rs, local, None)
        return 0.5 * (s1 + s2) / n, (lse1, pd1, lse2, pd2)

    def rows_backward(self, a, b, rs, local, stats, coef, columns_grad=True):
        n = a.shape[0]
        lse1, pd1, lse2, pd2 = stats
        c = coef / (2 * n)
        dq1, db, d_rs1 = self.k.rows_backward(a.index_select(0, local), b, rs, lse1, local, None, pd1, c)
        dq2, da, d_rs2 = self.k.rows_backward(b.index_select(0, local), a, rs, lse2, local, None, pd2, c)
        if not columns_grad:
            da.zero_()
            db.zero_()
        da.index_add_(0, local, dq1)
        db.index_add_(0, local, dq2)
        return da, db, d_rs1 + d_rs2


class SigLIP:
    """SigLIP's sigmoid loss of one pair (rows a against columns b, positives on the diagonal),
    divided by n as OpenCLIP's SigLipLoss.  Takes the logit bias (``takes_bias``): the driver
    passes it to every method and backward returns its gradient too."""

    takes_bias = True

    def __init__(self, kernels: SigLIPKernels):
        self.k = kernels

    def forward(self, a, b, rs, bias):
        n = a.shape[0]
        return self.k.forward(a, b, rs, torch.arange(n, device=a.device), bias) / n, None

    def backward(self, a, b, rs, bias, stats, coef):
        n = a.shape[0]
        return self.k.backward(a, b, rs, torch.arange(n, device=a.device), bias, coef / n)

    def rows_forward(self, a, b, rs, local, bias):
        return self.k.forward(a.index_select(0, local), b, rs, local, bias) / a.shape[0], None

    def rows_backward(self, a, b, rs, local, bias, stats, coef, columns_grad=True):
        dq, db, d_rs, d_bias = self.k.backward(a.index_select(0, local), b, rs, local, bias, coef / a.shape[0])
        if not columns_grad:
            db.zero_()
        da = torch.zeros_like(a).index_add_(0, local, dq)
        return da, db, d_rs, d_bias


def pair_forms(kernels: Union[PairKernels, SigLIPKernels]) -> Mapping[str, PairForm]:
    """The forms a kernel set serves, by the name users pass (form=...)."""
    if isinstance(kernels, SigLIPKernels):
        return {"siglip": SigLIP(kernels)}
    return {"ntxent": NTXent(kernels), "clip": Clip(kernels)}


def joined(a, b):
    """[a; b] as one [2n, D] tensor: the buffer a and b are the halves of (see gather_pair), else a copy."""
    n = a.shape[0]
    base = a._base
    if (base is not None and b._base is base and base.shape[0] == 2 * n and a.data_ptr() == base.data_ptr()
            and b.data_ptr() == base[n:].data_ptr()):
        return base
    return torch.cat([a, b])


def gather_pair(e, i, j, rows, acc, normalize=True):
    """The rows `rows` of modalities i and j, normalised (all are present), gathered straight into
    the two halves of one [2n, D] buffer, so that NT-Xent's [a; b] needs no copy:
    ((a, inv_a, projected_a), (b, inv_b, projected_b)); normalize=False: the rows as given,
    ((a, None, None), (b, None, None))."""
    n = rows.numel()
    u = torch.empty(2 * n, e.shape[-1], dtype=acc, device=e.device)
    out = []
    for m, half in ((i, u[:n]), (j, u[n:])):
        if e.dtype == acc:
            torch.index_select(e[m], 0, rows, out=half)
        else:
            half.copy_(e[m].index_select(0, rows))
        out.append(normalize_rows_(half) if normalize else (half, None, None))
    return out


def pair_row_scale(s, row_weights, rows, i, j, acc):
    """s * w_b for the rows `rows` of pair (i, j) (w = 1 without weights); contiguous."""
    if row_weights is None:
        return s.expand(rows.numel()).contiguous()
    return s * row_weights[:, i, j].index_select(0, rows).to(acc)


# After a pair, its buffers go back to the OS (release) only when they were at least this large
# (its [2n, D] rows and their gradients, logit tiles up to 2n x 2n): trimming costs the page
# faults of their reuse by the next pair, about 0.3 ms, which doubled the step time at B=64
# (M=5, D=256); smaller buffers stay with the allocator, for the next pair to reuse.
PAIR_RELEASE_BYTES = 2 ** 20


@contextlib.contextmanager
def _pair_loop(pair: PairForm, e: torch.Tensor, acc: torch.dtype):
    """Around one loop over pairs (forward or backward): holds the kernels' workspace and yields
    done(n), to call after each pair of n rows.  Free pages go back to the OS after a pair whose
    buffers reached PAIR_RELEASE_BYTES, and once more, for the workspace, when the loop ends."""
    released = False

    def done(n: int) -> None:
        nonlocal released
        if acc.itemsize * 2 * n * (e.shape[-1] + 2 * n) >= PAIR_RELEASE_BYTES:
            release(e.device)
            released = True
    with pair.k.workspace():
        yield done
    if released:
        release(e.device)


class _AllPairs(torch.autograd.Function):
    """Every active pair i < j of e [M, B, D] in one Function (see the module docstring)."""

    @staticmethod
    def forward(ctx, pair: PairForm, e, present, scale, row_weights, row_range, bias=None, normalize=True,
                columns_grad=True):
        M = e.shape[0]
        acc = accumulation_dtype(e.dtype)
        s = scale.detach().to(acc)
        extra = () if bias is None else (bias.detach().to(acc),)  # the forms that take a logit bias
        out = torch.zeros(M, M, dtype=acc, device=e.device)
        pairs = []
        release(e.device)  # what the caller's earlier steps freed (the scores' chunks)
        with _pair_loop(pair, e, acc) as pair_done:
            for i in range(M):
                for j in range(i + 1, M):
                    rows = torch.nonzero(present[i] & present[j]).squeeze(1)
                    if rows.numel() == 0:
                        continue
                    local = None
                    if row_range is not None:
                        local = torch.nonzero((rows >= row_range[0]) & (rows < row_range[1])).squeeze(1)
                        if local.numel() == 0:
                            continue
                    (a, _, _), (b, _, _) = gather_pair(e, i, j, rows, acc, normalize)
                    if local is None:
                        out[i, j], stats = pair.forward(a, b, pair_row_scale(s, row_weights, rows, i, j, acc), *extra)
                    else:
                        rs = pair_row_scale(s, row_weights, rows.index_select(0, local) - row_range[0], i, j, acc)
                        out[i, j], stats = pair.rows_forward(a, b, rs, local, *extra)
                    pairs.append((i, j, rows, local, stats))
                    del a, b
                    pair_done(rows.numel())  # its [2n, D] buffer is free
        ctx.save_for_backward(e, scale, row_weights, bias)
        ctx.pair, ctx.pairs, ctx.row_range = pair, pairs, row_range
        ctx.normalize, ctx.columns_grad = normalize, columns_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        e, scale, row_weights, bias = ctx.saved_tensors
        pair, row_range = ctx.pair, ctx.row_range
        acc = accumulation_dtype(e.dtype)
        s = scale.detach().to(acc)
        extra = () if bias is None else (bias.detach().to(acc),)
        d_bias = torch.zeros((), dtype=acc, device=e.device)
        de = torch.zeros(e.shape, dtype=acc, device=e.device)
        n_rows = e.shape[1] if row_range is None else row_range[1] - row_range[0]
        d_rows = torch.zeros(n_rows, e.shape[0], e.shape[0], dtype=acc, device=e.device)  # d loss / d (s w)
        grad = grad.to(acc)
        used = grad.ne(0).tolist()
        with _pair_loop(pair, e, acc) as pair_done:
            for i, j, rows, local, stats in ctx.pairs:
                if not used[i][j]:  # this pair's loss is not used: its gradient is exactly 0
                    continue
                (a, inv_a, proj_a), (b, inv_b, proj_b) = gather_pair(e, i, j, rows, acc, ctx.normalize)
                if local is None:
                    w_rows = rows
                    rs = pair_row_scale(s, row_weights, w_rows, i, j, acc)
                    grads = pair.backward(a, b, rs, *extra, stats, grad[i, j])
                else:
                    w_rows = rows.index_select(0, local) - row_range[0]
                    rs = pair_row_scale(s, row_weights, w_rows, i, j, acc)
                    grads = pair.rows_backward(a, b, rs, local, *extra, stats, grad[i, j], ctx.columns_grad)
                da, db, d_rs = grads[:3]
                if extra:
                    d_bias += grads[3]
                if ctx.normalize:
                    da = normalize_rows_backward(a, da, inv_a, proj_a)
                    db = normalize_rows_backward(b, db, inv_b, proj_b)
                de[i].index_add_(0, rows, da)
                de[j].index_add_(0, rows, db)
                d_rows[w_rows, i, j] = d_rs
                del a, b, da, db, grads
                pair_done(rows.numel())
        dweights = dscale = None
        if ctx.needs_input_grad[4]:
            dweights = (d_rows * s).to(row_weights.dtype)
        if ctx.needs_input_grad[3]:
            w = 1.0 if row_weights is None else row_weights.to(acc)
            dscale = (d_rows * w).sum().to(scale.dtype)
        dbias = d_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[6] else None
        return None, de.to(e.dtype), None, dscale, dweights, None, dbias, None, None


def all_pairs(forms: Mapping[str, PairForm], e, present, logit_scale, row_weights, form, row_range=None,
              logit_bias=None, normalize=True, columns_grad=True):
    """[M, M] pair losses of every active pair i < j (backend contract in scale_fast/_dispatch.py).

    forms: the backend's pair forms by name.  row_range=(start, stop) (the process-group path,
    scale_fast/distributed.py): e and present hold the global batch, only the loss terms of the
    rows whose sample lies in [start, stop) are summed (against every column), divided by the
    global normaliser, and row_weights is the local [stop - start, M, M]; summing the outputs
    over a partition of [0, B) gives the full loss.  logit_bias: a 0-dim tensor for the forms that
    take one ("siglip"), None for the others.  normalize=False: the rows are used as given (their
    norms at most 1, see scale_fast/_normalize.py within_unit_ball).  columns_grad=False (with
    row_range): the columns are constants, only the rows [start, stop) as queries get a gradient.
    """
    if row_range is not None:
        row_range = (int(row_range[0]), int(row_range[1]))
    return _AllPairs.apply(forms[form], e, present, logit_scale, row_weights, row_range, logit_bias, normalize,
                           columns_grad)


def _scaled_rows(a, weights, scale: float):
    acc = accumulation_dtype(a.dtype)
    rs = torch.full((a.shape[0],), scale, dtype=acc, device=a.device)
    return rs if weights is None else (rs * weights.to(acc)).contiguous()


class _InfoNCE(torch.autograd.Function):
    """mean_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_n) over the cross kernels, one direction."""

    @staticmethod
    def forward(ctx, kernels: PairKernels, a, b, weights, scale: float):
        acc = accumulation_dtype(a.dtype)
        a32, b32 = a.to(acc).contiguous(), b.to(acc).contiguous()
        rs = _scaled_rows(a, weights, scale)
        loss, lse, _, pos = kernels.cross_forward(a32, b32, rs, False)
        ctx.save_for_backward(a32, b32, rs, lse, pos)
        ctx.kernels, ctx.scale = kernels, scale
        ctx.dtypes = (a.dtype, b.dtype, None if weights is None else weights.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, rs, lse, pos = ctx.saved_tensors
        da, db, d_rs = ctx.kernels.cross_backward(a, b, rs, lse, None, pos, grad.to(a.dtype))
        dweights = None if ctx.dtypes[2] is None else (d_rs * ctx.scale).to(ctx.dtypes[2])
        return None, da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dweights, None


class _InfoNCERows(torch.autograd.Function):
    """Sum over this rank's rows of the info-NCE terms, against every rank's targets."""

    @staticmethod
    def forward(ctx, kernels: PairKernels, a, b, weights, scale: float, offset: int):
        acc = accumulation_dtype(a.dtype)
        a32, b32 = a.to(acc).contiguous(), b.to(acc).contiguous()
        rs = _scaled_rows(a, weights, scale)
        pos = torch.arange(offset, offset + a.shape[0], device=a.device)
        total, lse, pos_dot = kernels.rows_forward(a32, b32, rs, pos, None)
        ctx.save_for_backward(a32, b32, rs, lse, pos_dot, pos)
        ctx.kernels, ctx.scale = kernels, scale
        ctx.dtypes = (a.dtype, b.dtype, None if weights is None else weights.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        a, b, rs, lse, pos_dot, pos = ctx.saved_tensors
        da, db, d_rs = ctx.kernels.rows_backward(a, b, rs, lse, pos, None, pos_dot, grad.to(a.dtype))
        dweights = None if ctx.dtypes[2] is None else (d_rs * ctx.scale).to(ctx.dtypes[2])
        return None, da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), dweights, None, None


def info_nce(kernels: PairKernels, a, b, row_weights, scale):
    """One-direction InfoNCE of rows a against rows b (the "nce" masked task, docs/contract.md §5)."""
    return _InfoNCE.apply(kernels, a, b, row_weights, float(scale))


def info_nce_rows(kernels: PairKernels, a, b, row_weights, scale, offset):
    """sum_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_(offset+n)) over the rows a [R, F] against b [N, F].

    The row-block form of info_nce under a process group: a holds this rank's rows, b every
    rank's (gathered), and a_n's positive is b[offset + n].
    """
    return _InfoNCERows.apply(kernels, a, b, row_weights, float(scale), int(offset))
