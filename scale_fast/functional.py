"""The functional API (docs/contract.md §7): validate once, then dispatch each op to a backend."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from . import _validate as V
from ._compiled_ops import run_op
from ._dispatch import resolve_backend
from ._normalize import accumulation_dtype
from ._objective import group_pair_losses, pair_losses, scale_objective
from .types import MaskedTask, SCALELossOutput

Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]
DEFAULT_LOGIT_SCALE = 1 / 0.07
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = 10.0, -10.0  # OpenCLIP's SigLIP initialisation


def _prepare(embeddings, present, names=None):
    e = V.as_embeddings(embeddings)
    M, B, _ = e.shape
    present = V.as_present(present, M, B, e.device)
    V.check_finite_rows(e, present, names)
    return e, present


def inter_modality_scores(embeddings: Embeddings, present: torch.Tensor | None = None, *, mode: str = "sample",
                          normalize: bool = True):
    """Scores S, matching scores S' and the active-pair mask (docs/contract.md §3).

    embeddings: [M, B, D] or M tensors [B, D]; present: [M, B] bool; normalize=False: the
    rows as given (dot products, not cosines).
    Returns (S, S_prime, active): S and S_prime are [B, M, M] (mode="sample")
    or [M, M] (mode="batch"), float32 (float64 for float64 input); active is
    [M, M] bool.
    """
    V.check_choice("mode", mode, V.MODES)
    e, present = _prepare(embeddings, present)
    backend = resolve_backend("auto", e.device)
    return run_op(backend, "scores", e, present, mode, normalize=V.as_flag("normalize", normalize))


def multi_pair_info_nce(
    embeddings: Embeddings,
    present: torch.Tensor | None = None,
    *,
    logit_scale: float | torch.Tensor = DEFAULT_LOGIT_SCALE,
    weights: torch.Tensor | None = None,
    form: str = "ntxent",
    backend: str = "auto",
    logit_bias: float | torch.Tensor | None = None,
    normalize: bool = True,
    process_group=None,
    gather_with_grad: bool = True,
    partial: bool = False,
) -> torch.Tensor:
    """Contrastive loss of every modality pair i < j (docs/contract.md §4).

    weights: None (all 1), [M, M] or [B, M, M]; weights[b, i, j] multiplies the
    logits of the rows of sample b in pair (i, j).
    form: "ntxent", "clip" or "siglip" (sigmoid loss; logit_bias: a float or 0-dim
    tensor added to every logit, default 0, receiving its gradient like logit_scale).
    normalize: True: rows L2-normalised first (cosine logits); False: used as given (features a
    model already normalised: their gradient is not projected).
    Returns [M, M]: L(i, j) in the upper triangle of active pairs, 0 elsewhere.

    process_group: every rank passes its local batch; the loss is that of the global batch (the
    ranks' batches concatenated in rank order), with scale_loss's gradient contract
    (scale_fast/distributed.py); weights are the local [B_r, M, M].  partial=True: this rank's
    share instead (the terms of its rows against every column, over the global normaliser; the
    shares sum to the global loss), without the sum over ranks: backpropagating every rank's
    share gives each rank's inputs the single-process gradient of the global loss.
    gather_with_grad=False: the other ranks' rows are constants (no collective in backward) and
    this rank's rows get only the gradient of their own (query) terms.
    """
    V.check_choice("form", form, V.FORMS)
    e, present = _prepare(embeddings, present)
    M, B, _ = e.shape
    scale = V.as_logit_scale(logit_scale, e.device)
    bias = V.as_logit_bias(logit_bias, form, e.device)
    row_weights = V.as_pair_weights(weights, M, B, e.device)
    normalize = V.as_flag("normalize", normalize)
    backend = resolve_backend(backend, e.device)
    if process_group is None:
        if partial or not V.as_flag("gather_with_grad", gather_with_grad):
            raise ValueError("partial=True and gather_with_grad=False apply under a process_group only")
        return pair_losses(e, present, scale, bias, row_weights, form, backend, normalize)
    return group_pair_losses(e, present, scale, bias, row_weights, form, backend, normalize, process_group,
                             V.as_flag("gather_with_grad", gather_with_grad), V.as_flag("partial", partial))



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
            raise ValueError(f"target (probabilities) must have shape [N, K] = {(n, k)}, got {tuple(target.shape)} "
                             "(class ids must be an integer tensor)")
    else:
        V.check_tensor("target", target, floating=False)
        V.check_class_targets("target", target, n, k, ignore_index)
    row_scale = _row_scale(scale, n, device, accumulation_dtype(hidden.dtype))
    backend = resolve_backend(backend, device)
    return run_op(backend, "linear_cross_entropy", hidden, weight, target, bias, row_scale, ignore_index, reduction)


def _row_scale(scale, n: int, device, dtype: torch.dtype) -> torch.Tensor | None:
    """None, or an [N] tensor (a float or 0-dim tensor is broadcast, keeping its gradient; a float in the
    loss's dtype, so that a float64 loss stays exact)."""
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
    return torch.full((n,), float(scale), device=device, dtype=dtype)


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
    logit_bias: float | torch.Tensor | None = None,
    normalize: bool = True,
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

    normalize=False: the embeddings are used as given (scores are dot products, the pair
    logits s x . y), for features a model already normalised.
    """
    V.check_choice("mode", mode, V.MODES)
    V.check_choice("form", form, V.FORMS)
    e = V.as_embeddings(embeddings)
    M, B, _ = e.shape
    names = V.modality_names(modalities, M)
    e, present = _prepare(e, present, names)
    scale = V.as_logit_scale(logit_scale, e.device)
    bias = V.as_logit_bias(logit_bias, form, e.device)
    tasks = _task_table(tasks, M, names)
    for m, task in tasks.items():
        V.check_task(m, task, M, B, present, mode, needs_index=harmonize and mode == "sample")
    backend = resolve_backend(backend, e.device)
    te = None
    if task_embeddings is not None and harmonize and tasks:
        te = _check_task_embeddings(task_embeddings, e)
    return scale_objective(e, present, scale, tasks, te, mode, form, harmonize, detach_weights, backend,
                           process_group, bias, V.as_flag("normalize", normalize))


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
