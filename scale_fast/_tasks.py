"""The masked tasks (docs/contract.md §5): one table of task kinds, each giving (summed loss, count).

L_M of a task is its summed loss over its rows divided by its count: one process divides its
own sums by its own counts; under a process group each rank divides the sum over its rows by
the global count, and the ranks' shares are summed (scale_fast/_objective.py).

A kind is ``TaskKind(summed, count)``:
``summed(task, w_rows, backend, ranks) -> 0-dim`` sums the loss terms of the task's rows
(w_rows: [N] S' row weights or None; ranks: None in one process, else the ``TaskRanks`` of
the task, for kinds whose terms involve other ranks' rows); ``count(task)`` is the task's
normaliser over its local rows (an int, or a 0-dim integer tensor to avoid a host sync).
A new kind is one entry of ``KINDS`` (and its name in scale_fast/_validate.py TASK_KINDS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

from ._compiled_ops import run_op
from ._normalize import accumulation_dtype
from .types import TASK_KINDS, MaskedTask

Count = Union[int, torch.Tensor]


@dataclass
class TaskRanks:
    """What a kind needs of the other ranks: gather(x) concatenates every rank's rows of x (in rank
    order, differentiable); offset is this rank's first row in that concatenation."""

    gather: Callable[[torch.Tensor], torch.Tensor]
    offset: int


@dataclass(frozen=True)
class TaskKind:
    summed: Callable[[MaskedTask, Optional[torch.Tensor], str, Optional[TaskRanks]], torch.Tensor]
    count: Callable[[MaskedTask], Count]


def predictions(task: MaskedTask, acc: torch.dtype) -> torch.Tensor:
    """y = hidden @ weight.T + bias (or hidden itself), in the accumulation dtype."""
    hidden = task.hidden.to(acc)
    if task.weight is None:
        return hidden
    bias = None if task.bias is None else task.bias.to(acc)
    return F.linear(hidden, task.weight.to(acc), bias)


def _cross_entropy_sum(task, w_rows, backend):
    """sum over the rows of CE(w_r * (hidden_r @ weight.T + bias), target_r) (rows == ignore_index skipped)."""
    acc = accumulation_dtype(task.hidden.dtype)
    target = task.target if task.kind == "ce" else task.target.to(acc)
    if task.weight is not None:
        return run_op(backend, "linear_cross_entropy", task.hidden, task.weight, task.target, task.bias, w_rows,
                      task.ignore_index, "sum").to(acc)
    logits = task.hidden.to(acc) if w_rows is None else task.hidden.to(acc) * w_rows.to(acc)[:, None]
    return F.cross_entropy(logits, target, ignore_index=task.ignore_index, reduction="sum")


def _ce(task, w_rows, backend, ranks):
    return _cross_entropy_sum(task, w_rows, backend)


def _kl(task, w_rows, backend, ranks):
    # KL = soft cross-entropy minus the targets' entropy
    q = task.target.to(accumulation_dtype(task.hidden.dtype))
    return _cross_entropy_sum(task, w_rows, backend) + torch.special.xlogy(q, q).sum()


def _mse(task, w_rows, backend, ranks):
    acc = accumulation_dtype(task.hidden.dtype)
    y = predictions(task, acc)
    if w_rows is not None:
        y = y * w_rows.to(acc)[:, None]
    return ((y - task.target.to(acc)) ** 2).sum()


def _nce(task, w_rows, backend, ranks):
    # the row weight multiplies the logits, so it is passed to the op rather than applied to y
    # (which is L2-normalised)
    acc = accumulation_dtype(task.hidden.dtype)
    a = F.normalize(predictions(task, acc), dim=-1, eps=1e-12)
    b = F.normalize(task.target.to(acc), dim=-1, eps=1e-12)
    w = None if w_rows is None else w_rows.to(acc)
    if ranks is None:  # one process: the backend's fused mean over the rows, as a sum
        return run_op(backend, "info_nce", a, b, w, float(task.nce_scale)) * a.shape[0]
    b_all = ranks.gather(b)  # every rank joins, rows or not
    return run_op(backend, "info_nce_rows", a, b_all, w, float(task.nce_scale), ranks.offset)


KINDS: Dict[str, TaskKind] = {
    "ce": TaskKind(_ce, lambda t: (t.target != t.ignore_index).sum()),
    "kl": TaskKind(_kl, lambda t: t.hidden.shape[0]),
    "mse": TaskKind(_mse, lambda t: t.target.numel()),
    "nce": TaskKind(_nce, lambda t: t.hidden.shape[0]),
}
assert tuple(KINDS) == TASK_KINDS


def row_weights(task_weights: torch.Tensor, m: int, task: MaskedTask, mode: str) -> torch.Tensor:
    """[N] S' weights of task m's rows: S'_mm of each row's sample ("sample") or the batch's S'_mm."""
    if mode == "sample":
        return task_weights[:, m, m][task.sample_index]
    return task_weights[m, m].expand(task.hidden.shape[0])


def zero_linked(task: MaskedTask, dtype) -> torch.Tensor:
    """0, linked to the task's float tensors (so that they still get a 0 gradient)."""
    parts = [t for t in (task.hidden, task.weight, task.bias, task.target) if t is not None and t.is_floating_point()]
    return sum((t.sum() * 0).to(dtype) for t in parts) if parts else torch.zeros((), dtype=dtype)


def task_loss(task: MaskedTask, w_rows: Optional[torch.Tensor], backend: str, count: Count,
              ranks: Optional[TaskRanks] = None) -> torch.Tensor:
    """summed loss of the task's rows / count (count: the local count in one process, else the global one)."""
    acc = accumulation_dtype(task.hidden.dtype)
    has_rows = task.hidden.shape[0] > 0 or (ranks is not None and task.kind == "nce")  # nce joins the gather
    if not has_rows or (isinstance(count, int) and count == 0):
        return zero_linked(task, acc)
    summed = KINDS[task.kind].summed(task, w_rows, backend, ranks)
    if isinstance(count, torch.Tensor):
        return summed / count.clamp(min=1).to(acc)
    return summed / count


def count(task: MaskedTask) -> Count:
    """The task's normaliser over its local rows."""
    return KINDS[task.kind].count(task)


def local_counts(tasks: Dict[int, MaskedTask]) -> Dict[int, int]:
    """Each task's local count as an int (what the ranks exchange)."""
    return {m: int(count(t)) for m, t in tasks.items()}
