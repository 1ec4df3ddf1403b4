"""The functional API (docs/contract.md §7): validate once, then dispatch each op to a backend."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from . import _validate as V
from ._dispatch import get_op, resolve_backend
from ._normalize import accumulation_dtype
from .types import MaskedTask, SCALELossOutput

Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]
DEFAULT_LOGIT_SCALE = 1 / 0.07


def run_op(backend: str, name: str, *args):
    """Run backend op `name`; under torch.compile through its custom op (one graph node)."""
    if torch.compiler.is_compiling():
        from . import _compiled_ops

        return getattr(_compiled_ops, name)(*args, backend)
    return get_op(backend, name)(*args)


def _prepare(embeddings, present, names=None):
    e = V.as_embeddings(embeddings)
    M, B, _ = e.shape
    present = V.as_present(present, M, B, e.device)
    V.check_finite_rows(e, present, names)
    return e, present


def inter_modality_scores(embeddings: Embeddings, present: torch.Tensor | None = None, *, mode: str = "sample"):
    """Scores S, matching scores S' and the active-pair mask (docs/contract.md §3).

    embeddings: [M, B, D] or M tensors [B, D]; present: [M, B] bool.
    Returns (S, S_prime, active): S and S_prime are [B, M, M] (mode="sample")
    or [M, M] (mode="batch"), float32 (float64 for float64 input); active is
    [M, M] bool.
    """
    V.check_choice("mode", mode, V.MODES)
    e, present = _prepare(embeddings, present)
    backend = resolve_backend("auto", e.device)
    return run_op(backend, "scores", e, present, mode)


def multi_pair_info_nce(
    embeddings: Embeddings,
    present: torch.Tensor | None = None,
    *,
    logit_scale: float | torch.Tensor = DEFAULT_LOGIT_SCALE,
    weights: torch.Tensor | None = None,
    form: str = "ntxent",
    backend: str = "auto",
) -> torch.Tensor:
    """Contrastive loss of every modality pair i < j (docs/contract.md §4).

    weights: None (all 1), [M, M] or [B, M, M]; weights[b, i, j] multiplies the
    logits of the rows of sample b in pair (i, j).
    Returns [M, M]: L(i, j) in the upper triangle of active pairs, 0 elsewhere.
    """
    V.check_choice("form", form, V.FORMS)
    e, present = _prepare(embeddings, present)
    M, B, _ = e.shape
    scale = V.as_logit_scale(logit_scale, e.device)
    row_weights = V.as_pair_weights(weights, M, B, e.device)
    backend = resolve_backend(backend, e.device)
    return run_op(backend, "contrastive", e, present, scale, row_weights, form)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    scale: float | torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """F.cross_entropy(scale[:, None] * (hidden @ weight.T + bias), target) without storing the logits.

    hidden: [N, H]; weight: [K, H]; bias: [K]; target: [N] class ids (rows equal
    to ignore_index skipped) or [N, K] float probabilities; scale: None, a
    float, a 0-dim tensor or [N]. Returns a 0-dim loss ("mean", "sum") or [N]
    ("none"), float32 (float64 for float64 hidden). Unlike F.cross_entropy,
    "mean" over zero non-ignored rows is 0, not NaN.
    """
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_tensor("hidden", hidden, ndim=2, floating=True)
    if weight is None:
        raise TypeError("weight must be a torch.Tensor [K, H], got None")
    device = hidden.device
    k = V.check_linear_head("", hidden, weight, bias, device)
    n = hidden.shape[0]
    V.check_tensor("target", target)
    V.check_device("target", target, device)
    if target.is_floating_point():
        if tuple(target.shape) != (n, k):
            raise ValueError(f"target (probabilities) must have shape [N, K] = {(n, k)}, got {tuple(target.shape)}")
    else:
        V.check_tensor("target", target, floating=False)
        V.check_class_targets("target", target, n, k, ignore_index)
    row_scale = _row_scale(scale, n, device)
    backend = resolve_backend(backend, device)
    return run_op(backend, "linear_cross_entropy", hidden, weight, target, bias, row_scale, ignore_index, reduction)


def _row_scale(scale, n: int, device) -> torch.Tensor | None:
    """None, or an [N] tensor (a float or 0-dim tensor is broadcast, keeping its gradient)."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        V.check_tensor("scale", scale, floating=True)
        V.check_device("scale", scale, device)
        if scale.dim() == 0 or tuple(scale.shape) == (1,):
            return scale.reshape(()).expand(n)
        if tuple(scale.shape) != (n,):
            raise ValueError(f"scale must be a float, a 0-dim tensor or shape [N] = ({n},), got {tuple(scale.shape)}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, a float or a tensor, got {type(scale).__name__}")
    return torch.full((n,), float(scale), device=device)


def scale_loss(
    embeddings: Embeddings,
    present: torch.Tensor | None = None,
    *,
    logit_scale: float | torch.Tensor = DEFAULT_LOGIT_SCALE,
    tasks: Mapping[int | str, MaskedTask] | None = None,
    task_embeddings: Embeddings | None = None,
    modalities: Sequence[str] | None = None,
    mode: str = "sample",
    form: str = "ntxent",
    harmonize: bool = True,
    detach_weights: bool = False,
    backend: str = "auto",
    process_group=None,
) -> SCALELossOutput:
    """The SCALE objective (docs/contract.md §6): harmonized contrastive pairs plus masked tasks.

    embeddings: [M, B, D] (or M tensors [B, D]) modality CLS embeddings;
    present: [M, B] bool; tasks: {modality index or name: MaskedTask};
    task_embeddings: [M, B, D'] CLS vectors whose S' weights the masked tasks
    (default: embeddings); modalities: the names of the M modalities, as in
    SCALELoss (default: SCALE's text, image, table, video, audio when M == 5).
    A present row of embeddings that is not finite is a ValueError naming the
    modality and sample (SCALE_FAST_SKIP_FINITE_CHECK=1 skips that check).
    Returns SCALELossOutput.

    process_group: a torch.distributed process group (e.g. torch.distributed.group.WORLD)
    to compute the loss of the global batch, every rank passing its local batch (see
    scale_fast/distributed.py for the contract).  Then total, contrastive, masked and
    active are global (the same on every rank); scores and weights are the rank's local
    samples' [B_r, M, M] in mode="sample" and the global [M, M] in mode="batch".
    """
    V.check_choice("mode", mode, V.MODES)
    V.check_choice("form", form, V.FORMS)
    e = V.as_embeddings(embeddings)
    M, B, _ = e.shape
    names = V.modality_names(modalities, M)
    e, present = _prepare(e, present, names)
    scale = V.as_logit_scale(logit_scale, e.device)
    tasks = _task_table(tasks, M, names)
    for m, task in tasks.items():
        V.check_task(m, task, M, B, present, mode, needs_index=harmonize and mode == "sample")
    backend = resolve_backend(backend, e.device)
    if process_group is not None:
        from .distributed import scale_loss_distributed

        te = None
        if task_embeddings is not None and harmonize and tasks:
            te = _check_task_embeddings(task_embeddings, e)
        return scale_loss_distributed(e, present, scale, tasks, te, mode, form, harmonize, detach_weights,
                                      backend, process_group)
    S, S_prime, active = run_op(backend, "scores", e, present, mode)
    weights = S_prime.detach() if detach_weights else S_prime
    row_weights = None
    if harmonize:
        row_weights = weights if mode == "sample" else weights.expand(B, M, M)
    pair = run_op(backend, "contrastive", e, present, scale, row_weights, form)
    n_active = torch.triu(active, diagonal=1).sum()
    contrastive_term = pair.sum() / n_active.clamp(min=1).to(pair.dtype)

    masked = torch.zeros(M, dtype=pair.dtype, device=e.device)
    if tasks:
        task_weights = weights
        if task_embeddings is not None and harmonize:
            te = _check_task_embeddings(task_embeddings, e)
            _, task_S_prime, _ = run_op(backend, "scores", te, present, mode)
            task_weights = task_S_prime.detach() if detach_weights else task_S_prime
        losses = []
        for m in range(M):
            if m not in tasks:
                losses.append(masked[m])
                continue
            w_rows = None
            if harmonize:
                diag = task_weights[:, m, m] if mode == "sample" else task_weights[m, m]
                w_rows = diag[tasks[m].sample_index] if mode == "sample" else diag.expand(tasks[m].hidden.shape[0])
            losses.append(masked_task_loss(tasks[m], w_rows, backend).to(pair.dtype))
        masked = torch.stack(losses)
    total = contrastive_term + masked.sum()
    return SCALELossOutput(total, pair, masked, S, S_prime, active)


def _task_table(tasks, M: int, names) -> dict:
    """{modality index: task} from a mapping keyed by modality indices and/or names."""
    if tasks is None:
        return {}
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must be a mapping {{modality index or name: MaskedTask}}, got {type(tasks).__name__}")
    table = {}
    for key, task in tasks.items():
        m = V.task_index(key, M, names)
        if m in table:
            raise ValueError(f"tasks has two entries for {V.modality_label(m, names)}")
        table[m] = task
    return table


def _check_task_embeddings(task_embeddings, e: torch.Tensor) -> torch.Tensor:
    te = V.as_embeddings(task_embeddings, name="task_embeddings")
    if te.shape[:2] != e.shape[:2]:
        raise ValueError(f"task_embeddings must have shape [M, B, D'] with M, B = {tuple(e.shape[:2])}, got {tuple(te.shape)}")
    V.check_device("task_embeddings", te, e.device)
    return te


def masked_task_loss(task: MaskedTask, w_rows: torch.Tensor | None, backend: str) -> torch.Tensor:
    """L_M of one validated task (docs/contract.md §5); w_rows: [N] per-row weights or None."""
    hidden = task.hidden
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    if n == 0:
        return torch.zeros((), dtype=acc, device=hidden.device)
    if task.kind in ("ce", "kl"):
        target = task.target
        if task.weight is not None:
            loss = run_op(backend, "linear_cross_entropy", hidden, task.weight, target, task.bias, w_rows,
                          task.ignore_index, "mean")
        else:
            logits = hidden.to(acc) if w_rows is None else hidden.to(acc) * w_rows.to(acc)[:, None]
            if task.kind == "ce":
                kept = (target != task.ignore_index).sum()
                summed = F.cross_entropy(logits, target, ignore_index=task.ignore_index, reduction="sum")
                loss = summed / kept.clamp(min=1).to(acc)
            else:
                loss = F.cross_entropy(logits, target.to(acc), reduction="mean")
        if task.kind == "kl":  # KL = soft cross-entropy minus the targets' entropy
            q = target.to(acc)
            loss = loss + torch.special.xlogy(q, q).sum() / n
        return loss
    y = _predictions(task, acc)
    target = task.target.to(acc)
    if task.kind == "mse":
        if w_rows is not None:
            y = y * w_rows.to(acc)[:, None]
        return ((y - target) ** 2).sum() / target.numel()
    # nce: the row weight multiplies the logits, so it is passed to the op
    # rather than applied to y (which is L2-normalised).
    a = F.normalize(y, dim=-1, eps=1e-12)
    b = F.normalize(target, dim=-1, eps=1e-12)
    return run_op(backend, "info_nce", a, b, None if w_rows is None else w_rows.to(acc), float(task.nce_scale))


def _predictions(task: MaskedTask, acc: torch.dtype) -> torch.Tensor:
    """y = hidden @ weight.T + bias (or hidden itself), in the accumulation dtype."""
    hidden = task.hidden.to(acc)
    if task.weight is None:
        return hidden
    bias = None if task.bias is None else task.bias.to(acc)
    return F.linear(hidden, task.weight.to(acc), bias)
