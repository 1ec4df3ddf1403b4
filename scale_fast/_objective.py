"""The SCALE objective (docs/contract.md §6) on validated inputs, for one process or a process group.

One process is the world-size-1 case of the process-group path (scale_fast/distributed.py),
written out where that is simpler: no gathers, the contrastive op over all rows, the masked
tasks divided by their local counts and no final sum over ranks.

Under torch.compile the ops of one process are custom ops (scale_fast/_compiled_ops.py).  The
process-group path first exchanges the ranks' layout (batch sizes, task rows and counts): Python
integers that shape the gathers, which a traced graph cannot hold, so under torch.compile that path
runs whole as one custom op of the same table, ``scale_fast::scale_objective_group``, with
the process group passed by name.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import distributed as D
from ._compiled_ops import CompiledOp, register, run_op
from ._normalize import accumulation_dtype, within_unit_ball
from ._tasks import TaskRanks, count, local_counts, row_weights, task_loss
from .backends._scores import harmonize as harmonize_scores
from .types import TASK_KINDS, MaskedTask, SCALELossOutput


def _batch_scores(e, present, backend, active, counts, group, normalize=True):
    """Global batch-mode (S, S'): local Gram sums all-reduced with gradient."""
    S_local, _, _ = run_op(backend, "scores", e, present, "batch", normalize=normalize)
    pf = present.to(S_local.dtype)
    gram_sum = D.all_reduce_sum(S_local * (pf @ pf.T), group)  # S_local is the local mean: back to a sum
    S = torch.where(active, gram_sum / counts.clamp(min=1), torch.zeros_like(gram_sum))
    return S, harmonize_scores(S, active)


def pair_op(form: str, scale: torch.Tensor, bias: torch.Tensor | None, row_weights):
    """(op name, its arguments after e and present, as a tuple): "siglip" or "contrastive"."""
    if form == "siglip":
        return "siglip", (scale, bias if bias is not None else torch.zeros((), device=scale.device), row_weights)
    return "contrastive", (scale, row_weights, form)


def pair_losses(e, present, scale, bias, row_weights, form: str, backend: str, normalize: bool = True,
                row_range=None, columns_grad: bool = True):
    """[M, M] pair losses (docs/contract.md §4) of e [M, B, D]; row_range=(start, stop): the terms of
    those samples' rows only, e and present holding every rank's batch (scale_fast/distributed.py).
    normalize=False: the present rows as given (brought inside the unit ball by a power of two,
    the scale multiplied back: the same logits)."""
    if not normalize:
        e, r2 = within_unit_ball(e, present)
        scale = scale * r2
    op, args = pair_op(form, scale, bias, row_weights)
    return run_op(backend, op, e, present, *args, row_range=row_range, normalize=normalize, columns_grad=columns_grad)


def group_pair_losses(e, present, scale, bias, row_weights, form: str, backend: str, normalize: bool, group,
                      gather_with_grad: bool = True, partial: bool = False):
    """multi_pair_info_nce over a process group: every rank passes its local batch (docs/contract.md §10).

    This rank's rows against every rank's columns, over the global normaliser (its share); partial:
    that share, else the sum over ranks (with gradient, as scale_loss).  gather_with_grad=False: the
    other ranks' rows are constants and this rank's rows get the gradient of their query terms only.
    """
    layout = D.exchange_layout(e, {}, None, {}, group)
    gather = D.gather_rows if gather_with_grad else D.gather_rows_no_grad
    e_all = gather(e, layout.sizes, 1, group)
    present_all = D.gather_rows(present.to(torch.uint8), layout.sizes, 1, group).bool()
    rows = (layout.start, layout.start + e.shape[1])
    share = pair_losses(e_all, present_all, scale, bias, row_weights, form, backend, normalize, rows,
                        columns_grad=gather_with_grad).to(accumulation_dtype(e.dtype))
    return share if partial else D.all_reduce_sum(share, group)


def scale_objective(e: torch.Tensor, present: torch.Tensor, scale: torch.Tensor, tasks: Dict[int, MaskedTask],
                    task_embeddings: Optional[torch.Tensor], mode: str, form: str, harmonize: bool,
                    detach_weights: bool, backend: str, group=None, logit_bias=None,
                    normalize: bool = True) -> SCALELossOutput:
    """scale_loss of this process's batch (group None) or of the group's global batch (see scale_fast/distributed.py)."""
    if group is not None and torch.compiler.is_compiling():
        return _objective_op(e, present, scale, tasks, task_embeddings, mode, form, harmonize, detach_weights,
                             backend, group, logit_bias, normalize)
    M, B, _ = e.shape
    acc = accumulation_dtype(e.dtype)
    layout = None
    if group is None:
        e_all, present_all = e, present
    else:  # 1. sizes and task layout; 2. the global batch
        layout = D.exchange_layout(e, tasks, task_embeddings, local_counts(tasks), group)
        e_all = D.gather_rows(e, layout.sizes, 1, group)
        present_all = D.gather_rows(present.to(torch.uint8), layout.sizes, 1, group).bool()

    # 3. scores (sample mode: the local samples' own; batch mode: from the global Gram sums)
    def scores(x):
        if mode == "batch" and group is not None:
            return _batch_scores(x, present, backend, active, counts, group, normalize)
        S, S_prime, _ = run_op(backend, "scores", x, present, mode, normalize=normalize)
        return S, S_prime

    pf = present_all.to(acc)
    counts = pf @ pf.T  # |P_ij| of the (global) batch
    active = counts >= 1
    S, S_prime = scores(e)
    weights = S_prime.detach() if detach_weights else S_prime
    pair_weights = None
    if harmonize:
        pair_weights = weights if mode == "sample" else weights.expand(B, M, M)

    # 4. the contrastive losses (under a group: the terms of this rank's rows, against every column)
    if group is None:
        pair = pair_losses(e, present, scale, logit_bias, pair_weights, form, backend, normalize)
    else:
        rows = (layout.start, layout.start + B)
        pair = pair_losses(e_all, present_all, scale, logit_bias, pair_weights, form, backend, normalize,
                           rows).to(acc)

    masked = torch.zeros(M, dtype=pair.dtype, device=e.device)
    if tasks:
        task_weights = weights
        if task_embeddings is not None and harmonize:
            _, task_S_prime = scores(task_embeddings)
            task_weights = task_S_prime.detach() if detach_weights else task_S_prime
        losses = []
        for m in range(M):
            if m not in tasks:
                losses.append(masked[m])
                continue
            task = tasks[m]
            w_rows = row_weights(task_weights, m, task, mode) if harmonize else None
            if group is None:
                loss = task_loss(task, w_rows, backend, count(task))
            else:
                sizes = layout.task_rows[m]
                ranks = TaskRanks(lambda x, sizes=sizes: D.gather_rows(x, sizes, 0, group), sum(sizes[:layout.rank]))
                loss = task_loss(task, w_rows, backend, layout.task_counts[m], ranks)
            losses.append(loss.to(pair.dtype))
        masked = torch.stack(losses)

    if group is not None:  # 5. sum the ranks' shares (one all_reduce, with gradient)
        summed = D.all_reduce_sum(torch.cat([pair.reshape(-1), masked]), group)
        pair, masked = summed[: M * M].reshape(M, M), summed[M * M:]
    n_active = torch.triu(active, diagonal=1).sum()
    total = pair.sum() / n_active.clamp(min=1).to(pair.dtype) + masked.sum()
    return SCALELossOutput(total, pair, masked, S, S_prime, active)


# ------------------------------------------------------------------ the process-group path under torch.compile
_TASK_FIELDS = ("hidden", "target", "weight", "bias", "sample_index")


def _objective_op(e, present, scale, tasks, task_embeddings, mode, form, harmonize, detach_weights, backend, group,
                  logit_bias, normalize) -> SCALELossOutput:
    """scale_objective under a process group as the one custom op scale_fast::scale_objective_group."""
    fields = [[getattr(tasks[m], f) for f in _TASK_FIELDS] for m in sorted(tasks)]
    tensors = [t for row in fields for t in row if t is not None]  # a tensor list may not hold None
    layout = [v for m, row in zip(sorted(tasks), fields)
              for v in (m, TASK_KINDS.index(tasks[m].kind), tasks[m].ignore_index, *(t is not None for t in row))]
    nce_scales = [float(tasks[m].nce_scale) for m in sorted(tasks)]
    out = _OBJECTIVE_GROUP(e, present, scale, logit_bias, task_embeddings, tensors, layout, nce_scales, mode, form,
                           harmonize, detach_weights, normalize, group.group_name, backend)
    return SCALELossOutput(*out)


def _objective_group(backend, e, present, scale, logit_bias, task_embeddings, tensors, layout, nce_scales, mode,
                     form, harmonize, detach_weights, normalize, group_name):
    """The eager objective of _objective_op's flattened arguments, as a list of SCALELossOutput's fields."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    tasks, given, width = {}, iter(tensors), 3 + len(_TASK_FIELDS)
    for i, nce_scale in enumerate(nce_scales):
        m, kind, ignore_index, *has = layout[width * i: width * (i + 1)]
        fields = {f: next(given) if h else None for f, h in zip(_TASK_FIELDS, has)}
        tasks[m] = MaskedTask(TASK_KINDS[kind], ignore_index=ignore_index, nce_scale=nce_scale, **fields)
    out = scale_objective(e, present, scale, tasks, task_embeddings, mode, form, harmonize, detach_weights, backend,
                          _resolve_process_group(group_name), logit_bias, normalize)
    return [out.total, out.contrastive, out.masked, out.scores, out.weights, out.active]


def _objective_group_fake(e, present, scale, logit_bias, task_embeddings, tensors, layout, nce_scales, mode, *rest):
    M, B, _ = e.shape
    acc = accumulation_dtype(e.dtype)
    scores_shape = (B, M, M) if mode == "sample" else (M, M)
    return [e.new_empty((), dtype=acc), e.new_empty((M, M), dtype=acc), e.new_empty((M,), dtype=acc),
            e.new_empty(scores_shape, dtype=acc), e.new_empty(scores_shape, dtype=acc),
            e.new_empty((M, M), dtype=torch.bool)]


_OBJECTIVE_GROUP = register(CompiledOp(
    "scale_objective_group",
    "Tensor e, Tensor present, Tensor scale, Tensor? logit_bias, Tensor? task_embeddings, Tensor[] tasks, "
    "int[] task_layout, float[] nce_scales, str mode, str form, bool harmonize, bool detach_weights, bool normalize, "
    "str group",
    "Tensor[]", ("e", "scale", "logit_bias", "task_embeddings", "tasks"), _objective_group_fake,
    run=_objective_group))
