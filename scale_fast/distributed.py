"""scale_loss over a torch.distributed process group: the loss of the global batch, each rank
computing only its own rows.  This module holds the collectives and the layout exchange; the
objective itself (the same code as one process) is scale_fast/_objective.py.

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
   divided by the global normaliser (a contrastive op with ``row_range``); masked tasks sum their
   local rows divided by the global counts (scale_fast/_tasks.py; "nce" gathers its targets);
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

The contrastive op runs on a backend whose record declares its ``row_range`` form (torch;
triton for ntxent / clip; cpp for siglip; otherwise scale_fast/_dispatch.py falls back to
torch); scores and the masked tasks keep their backend.  Under torch.compile the whole path is one
custom op (scale_fast/_objective.py): the layout exchange yields Python integers that shape the
gathers, which a traced graph cannot hold, so ``torch.compile(fullgraph=True)`` of scale_loss under
a group runs the path eagerly inside that op (its backward recomputes it, collectives included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist

from .types import TASK_KINDS, MaskedTask


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


class _SumGrads(torch.autograd.Function):
    """Identity; backward: the sum over ranks of the incoming gradients (a replicated input whose
    gradient every rank must see in full)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

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


def sum_grads(x: torch.Tensor, group) -> torch.Tensor:
    """x, whose backward sums the gradients of every rank (each rank gets the total)."""
    return _SumGrads.apply(x, group)


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


def gather_rows_no_grad(x: torch.Tensor, sizes: List[int], dim: int, group) -> torch.Tensor:
    """gather_rows without gradient through the other ranks' rows: they are constants here, and
    this rank's own rows are x itself (its gradient stays local; no collective in backward)."""
    with torch.no_grad():
        full = gather_rows(x.detach(), sizes, dim, group)
    start = sum(sizes[:dist.get_rank(group)])
    stop = start + x.shape[dim]
    return torch.cat([full.narrow(dim, 0, start), x, full.narrow(dim, stop, full.shape[dim] - stop)], dim=dim)


def _gather_meta(values: List[int], device, group) -> torch.Tensor:
    """[world_size, len(values)] int64: every rank's small integer metadata."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).cpu()


# ---------------------------------------------------------------------------------- the layout
@dataclass
class Layout:
    """What the ranks agree on before the loss: sizes[r] = B_r, this rank's first sample `start`,
    and per task m the rows of every rank (task_rows[m]) and the global count (task_counts[m])."""

    rank: int
    sizes: List[int]
    start: int
    task_rows: Dict[int, List[int]]
    task_counts: Dict[int, int]


def exchange_layout(e, tasks: Dict[int, MaskedTask], task_embeddings, counts: Dict[int, int], group) -> Layout:
    """Step 1: one all_gather of (B_r, M, D, task layout, row counts); the layout must agree across ranks."""
    M, B, D = e.shape
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    meta = [B, M, D, int(task_embeddings is not None)]
    for m in range(M):
        t = tasks.get(m)
        if t is None:
            meta += [-1, 0, 0, 0]
            continue
        feat = t.target.shape[1] if t.target.dim() == 2 else t.hidden.shape[1]
        meta += [TASK_KINDS.index(t.kind), t.hidden.shape[0], counts[m], feat]
    table = _gather_meta(meta, e.device, group)
    per_task = table[:, 4:].reshape(world, M, 4)
    layout = torch.cat([table[:, 1:4], per_task[:, :, 0], per_task[:, :, 3]], 1)
    if not bool((layout == layout[0]).all()):
        raise ValueError(
            "under a process group every rank must pass the same M, D, tasks keys and kinds, task feature "
            "sizes, and task_embeddings or not (a rank without rows passes a task with 0 rows); "
            f"got per rank [M, D, has_task_embeddings, kinds..., feature sizes...] = {layout.tolist()}"
        )
    sizes = table[:, 0].tolist()
    return Layout(rank, sizes, sum(sizes[:rank]),
                  {m: per_task[:, m, 1].tolist() for m in tasks}, {m: int(per_task[:, m, 2].sum()) for m in tasks})
