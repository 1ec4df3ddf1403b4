"""scale_loss over a torch.distributed process group: the loss of the global batch, each rank
computing only its own rows.

Contract (tested in tests/test_distributed.py):

- every rank returns the same ``total`` (and ``contrastive``, ``masked``, ``active``), equal to
  the loss one process computes on the concatenation of the ranks' local batches in rank order;
- the gradient a rank's backward leaves on its rank-local inputs (embeddings, task embeddings,
  hidden states, float targets) is ``world_size * d(global loss)/d(input)``, and the mean over the
  ranks of the gradient of a replicated input (logit_scale, head weight and bias) is the
  single-process gradient.  DistributedDataParallel averages gradients over ranks, so a DDP
  model gets exactly the single-process gradient of the global batch.

How (one call, ranks may hold different local batch sizes B_r, and any rank may lack a modality):

1. one small all_gather of per-rank metadata (B_r, each task's row count and non-ignored count,
   the task layout, which is checked to agree across ranks);
2. the embeddings [M, B_r, D] are padded to max B_r, all-gathered *with gradient* (the backward
   reduce-scatters: each rank receives the sum over ranks of the gradient on its rows) and unpadded;
   ``present`` is all-gathered the same way (without gradient);
3. scores: per sample (mode="sample") they only involve the rank's own samples and are computed
   locally; in mode="batch" the [M, M] Gram sums are all-reduced (with gradient) and S, S' formed
   from the global sums;
4. each rank sums the contrastive loss terms of *its own rows only* (both halves of NT-Xent that
   belong to its samples, both directions of clip) against every column of the global batch,
   divided by the global normaliser (the torch backend's contrastive op with ``row_range``);
   masked tasks sum their local rows divided by the global counts ("nce" gathers its targets);
5. the partial [M, M] pair losses and [M] masked losses are summed over ranks by one autograd
   all_reduce (backward: all_reduce of the incoming gradients, i.e. world_size for the total).

Memory: a rank forms [T, T] tiles of (its rows) x (all columns), never the global B x B; it holds
the gathered [M, B, D] embeddings and their gradient buffer.

Communication per call (W ranks, Bmax = max_r B_r, elements sent/received by each rank):
forward all-gathers the padded embeddings, W * M * Bmax * D received, and ``present``
(W * M * Bmax bytes); backward sends the embedding gradient back once (a reduce-scatter of
W * M * Bmax * D on NCCL; on gloo, which has no reduce-scatter, an all_reduce of that buffer,
about twice the traffic).  task_embeddings are not gathered (sample mode: local; batch mode: an
[M, M] Gram sum).  Everything else is O(M^2) numbers (the partial losses, the batch-mode Gram
sums) or O(M) integers (sizes, counts), plus, for an "nce" task, its target features
(W * max_r N_r * F, and the same again in backward).  That is 4 collectives in forward (sizes,
embeddings, present, losses; +1 per batch-mode Gram sum and per "nce" task) and one in backward
per differentiable one (embeddings, losses, Gram sums, "nce" targets).

The contrastive op runs on a backend whose record declares its ``row_range`` form (today the
torch backend; scale_fast/_dispatch.py falls back to it); scores and the masked tasks keep
their backend.  The distributed path is eager-only (not wrapped in custom ops for
torch.compile).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._dispatch import get_op
from ._normalize import accumulation_dtype
from .backends.torch.scores import harmonize as _harmonize
from .types import TASK_KINDS, MaskedTask, SCALELossOutput


# ---------------------------------------------------------------------------------- collectives
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    """[world, *x.shape]: every rank's x; backward: rank r gets the sum over ranks of the gradient of slot r.

    The backward is a reduce-scatter (NCCL), or an all_reduce then the own slot where the backend
    has no reduce-scatter (gloo).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group),) + tuple(x.shape))
        dist.all_gather_into_tensor(out, x, group=group) if _has_tensor_collectives(x, group) else \
            dist.all_gather(list(out.unbind(0)), x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        if _has_tensor_collectives(grad, group):
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad[dist.get_rank(group)].clone(), None


def _has_tensor_collectives(x: torch.Tensor, group) -> bool:
    """NCCL (and other device backends) have all_gather_into_tensor / reduce_scatter_tensor; gloo does not."""
    return x.device.type != "cpu" and dist.get_backend(group) != "gloo"


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks, differentiable: the backward all-reduces (sums) the incoming gradients."""
    return _AllReduceSum.apply(x, group)


def gather_rows(x: torch.Tensor, sizes: List[int], dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along `dim` (rank r holds sizes[r] rows there): pad, all_gather, unpad.

    Differentiable: rank r's x gets the sum over ranks of the gradient that reached its rows.
    """
    longest = max(sizes)
    pad = longest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    parts = _AllGather.apply(x, group).unbind(0)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _gather_meta(values: List[int], device, group) -> torch.Tensor:
    """[world_size, len(values)] int64: every rank's small integer metadata."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).cpu()


# ---------------------------------------------------------------------------------- the loss
def _batch_scores(e, present, backend, active, counts, group, run_op):
    """Global batch-mode (S, S'): local Gram sums all-reduced with gradient."""
    S_local, _, _ = run_op(backend, "scores", e, present, "batch")
    pf = present.to(S_local.dtype)
    gram_sum = all_reduce_sum(S_local * (pf @ pf.T), group)  # S_local is the local mean: back to a sum
    S = torch.where(active, gram_sum / counts.clamp(min=1), torch.zeros_like(gram_sum))
    return S, _harmonize(S, active)


def _zero_linked(task: MaskedTask, dtype) -> torch.Tensor:
    """0, linked to the task's float tensors (so that a rank without rows still gives them a 0 gradient)."""
    parts = [t for t in (task.hidden, task.weight, task.bias, task.target) if t is not None and t.is_floating_point()]
    return sum((t.sum() * 0).to(dtype) for t in parts) if parts else torch.zeros((), dtype=dtype)


def _masked_partial(task: MaskedTask, w_rows, backend, n_global: int, kept_global: int, offset: int,
                    row_sizes: List[int], group, run_op) -> torch.Tensor:
    """This rank's share of L_M(m): its rows' terms divided by the global counts (docs/contract.md §5)."""
    from .functional import _predictions

    hidden = task.hidden
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    if n_global == 0:
        return _zero_linked(task, acc)
    if task.kind == "nce":  # every rank joins the gather of the targets, rows or not
        y = _predictions(task, acc)
        a = F.normalize(y, dim=-1, eps=1e-12)
        b = gather_rows(F.normalize(task.target.to(acc), dim=-1, eps=1e-12), row_sizes, 0, group)
        w = None if w_rows is None else w_rows.to(acc)
        return get_op(backend, "info_nce_rows", a, b)(a, b, w, float(task.nce_scale), offset) / n_global
    if n == 0:
        return _zero_linked(task, acc)
    if task.kind in ("ce", "kl"):
        target = task.target
        denom = kept_global if task.kind == "ce" else n_global
        if task.weight is not None:
            summed = run_op(backend, "linear_cross_entropy", hidden, task.weight, target, task.bias, w_rows,
                            task.ignore_index, "sum").to(acc)
        else:
            logits = hidden.to(acc) if w_rows is None else hidden.to(acc) * w_rows.to(acc)[:, None]
            if task.kind == "ce":
                summed = F.cross_entropy(logits, target, ignore_index=task.ignore_index, reduction="sum")
            else:
                summed = F.cross_entropy(logits, target.to(acc), reduction="sum")
        if task.kind == "kl":
            q = target.to(acc)
            summed = summed + torch.special.xlogy(q, q).sum()
        return summed / max(denom, 1)
    y = _predictions(task, acc)  # mse
    if w_rows is not None:
        y = y * w_rows.to(acc)[:, None]
    return ((y - task.target.to(acc)) ** 2).sum() / (n_global * task.target.shape[1])


def scale_loss_distributed(e, present, scale, tasks: Dict[int, MaskedTask], task_embeddings, mode, form,
                           harmonize, detach_weights, backend, group) -> SCALELossOutput:
    """scale_loss of the global batch (inputs already validated rank-locally by scale_loss)."""
    from .functional import run_op

    M, B, D = e.shape
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = e.device
    acc = accumulation_dtype(e.dtype)

    # 1. metadata: sizes, task layout and counts
    meta = [B, M, D, int(task_embeddings is not None)]
    for m in range(M):
        t = tasks.get(m)
        if t is None:
            meta += [-1, 0, 0, 0]
            continue
        n = t.hidden.shape[0]
        kept = int((t.target != t.ignore_index).sum()) if t.kind == "ce" else n
        feat = t.target.shape[1] if t.target.dim() == 2 else t.hidden.shape[1]
        meta += [TASK_KINDS.index(t.kind), n, kept, feat]
    table = _gather_meta(meta, device, group)
    layout = torch.cat([table[:, 1:4], table[:, 4:].reshape(world, M, 4)[:, :, 0], table[:, 4:].reshape(world, M, 4)[:, :, 3]], 1)
    if not bool((layout == layout[0]).all()):
        raise ValueError(
            "under a process group every rank must pass the same M, D, tasks keys and kinds, task feature "
            "sizes, and task_embeddings or not (a rank without rows passes a task with 0 rows); "
            f"got per rank [M, D, has_task_embeddings, kinds..., feature sizes...] = {layout.tolist()}"
        )
    sizes = table[:, 0].tolist()
    start = sum(sizes[:rank])
    task_meta = table[:, 4:].reshape(world, M, 4)

    # 2. the global batch
    e_all = gather_rows(e, sizes, 1, group)
    present_all = gather_rows(present.to(torch.uint8), sizes, 1, group).bool()
    pf = present_all.to(acc)
    counts = pf @ pf.T
    active = counts >= 1

    # 3. scores
    if mode == "sample":
        S, S_prime, _ = run_op(backend, "scores", e, present, "sample")
    else:
        S, S_prime = _batch_scores(e, present, backend, active, counts, group, run_op)
    weights = S_prime.detach() if detach_weights else S_prime
    row_weights = None
    if harmonize:
        row_weights = weights if mode == "sample" else weights.expand(B, M, M)

    # 4. partial losses of this rank's rows
    contrastive_op = get_op(backend, "contrastive", e_all, row_range=True)
    pair_part = contrastive_op(e_all, present_all, scale, row_weights, form, (start, start + B)).to(acc)

    masked_part = torch.zeros(M, dtype=acc, device=device)
    if tasks:
        task_weights = weights
        if task_embeddings is not None and harmonize:
            if mode == "sample":
                _, tsp, _ = run_op(backend, "scores", task_embeddings, present, "sample")
            else:
                _, tsp = _batch_scores(task_embeddings, present, backend, active, counts, group, run_op)
            task_weights = tsp.detach() if detach_weights else tsp
        parts = []
        for m in range(M):
            if m not in tasks:
                parts.append(masked_part[m])
                continue
            task = tasks[m]
            w_rows = None
            if harmonize:
                diag = task_weights[:, m, m] if mode == "sample" else task_weights[m, m]
                w_rows = diag[task.sample_index] if mode == "sample" else diag.expand(task.hidden.shape[0])
            n_per_rank = task_meta[:, m, 1].tolist()
            parts.append(_masked_partial(task, w_rows, backend, sum(n_per_rank), int(task_meta[:, m, 2].sum()),
                                         sum(n_per_rank[:rank]), n_per_rank, group, run_op).to(acc))
        masked_part = torch.stack(parts)

    # 5. sum over ranks (one all_reduce, with gradient)
    summed = all_reduce_sum(torch.cat([pair_part.reshape(-1), masked_part]), group)
    pair, masked = summed[: M * M].reshape(M, M), summed[M * M:]
    n_active = torch.triu(active, diagonal=1).sum()
    total = pair.sum() / n_active.clamp(min=1).to(pair.dtype) + masked.sum()
    return SCALELossOutput(total, pair, masked, S, S_prime, active)
