"""Input checks done once at the functional boundary, before any backend runs.

Each failure is a TypeError (wrong kind of thing) or ValueError (wrong shape,
range or option) whose message starts with the argument's name.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .types import TASK_KINDS, MaskedTask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("sample", "batch")
FORMS = ("ntxent", "clip")
REDUCTIONS = ("mean", "sum", "none")


def values_checked() -> bool:
    """Checks that read tensor values (a host sync) are skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating is True and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but embeddings are on {device}")


def as_embeddings(embeddings, name: str = "embeddings") -> torch.Tensor:
    """[M, B, D] from a tensor or a sequence of M tensors [B, D]."""
    if isinstance(embeddings, (list, tuple)):
        if len(embeddings) < 2:
            raise ValueError(f"{name} must hold at least 2 modalities, got {len(embeddings)}")
        parts = [check_tensor(f"{name}[{m}]", e, ndim=2, floating=True) for m, e in enumerate(embeddings)]
        for m, e in enumerate(parts[1:], start=1):
            if e.shape != parts[0].shape or e.dtype != parts[0].dtype or e.device != parts[0].device:
                raise ValueError(
                    f"{name}[{m}] has shape {tuple(e.shape)}, {e.dtype} on {e.device}; "
                    f"{name}[0] has {tuple(parts[0].shape)}, {parts[0].dtype} on {parts[0].device}"
                )
        embeddings = torch.stack(parts)
    e = check_tensor(name, embeddings, ndim=3, floating=True)
    M, B, D = e.shape
    if M < 2:
        raise ValueError(f"{name} must hold at least 2 modalities (M >= 2), got shape {tuple(e.shape)}")
    if B < 1 or D < 1:
        raise ValueError(f"{name} must have B >= 1 samples and D >= 1 features, got shape {tuple(e.shape)}")
    return e


def as_present(present, M: int, B: int, device: torch.device) -> torch.Tensor:
    if present is None:
        return torch.ones(M, B, dtype=torch.bool, device=device)
    check_tensor("present", present, ndim=2)
    if present.dtype != torch.bool:
        raise TypeError(f"present must be a bool tensor, got {present.dtype}")
    if tuple(present.shape) != (M, B):
        raise ValueError(f"present must have shape [M, B] = {(M, B)}, got {tuple(present.shape)}")
    check_device("present", present, device)
    return present


def as_logit_scale(logit_scale, device: torch.device, name: str = "logit_scale") -> torch.Tensor:
    """A 0-dim float tensor > 0 (a float becomes a constant tensor)."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim float tensor, got {type(logit_scale).__name__}")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or logit_scale.dim() > 1:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(logit_scale.shape)}")
        if logit_scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {logit_scale.dtype}")
        check_device(name, logit_scale, device)
        tensor = logit_scale.reshape(())
        if not values_checked():
            return tensor
        value = float(logit_scale.detach())
    else:
        value = float(logit_scale)
        tensor = torch.tensor(value, dtype=torch.float32, device=device)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return tensor


def as_pair_weights(weights, M: int, B: int, device: torch.device) -> torch.Tensor | None:
    """None, or [B, M, M] (an [M, M] matrix is shared by every sample)."""
    if weights is None:
        return None
    check_tensor("weights", weights, floating=True)
    check_device("weights", weights, device)
    if tuple(weights.shape) == (M, M):
        return weights.expand(B, M, M)
    if tuple(weights.shape) != (B, M, M):
        raise ValueError(f"weights must have shape [M, M] = {(M, M)} or [B, M, M] = {(B, M, M)}, got {tuple(weights.shape)}")
    return weights


def check_sample_index(name: str, index: torch.Tensor, n: int, B: int, device: torch.device) -> None:
    check_tensor(name, index, ndim=1, floating=False)
    check_device(name, index, device)
    if index.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got {index.shape[0]}")
    if n and values_checked() and (int(index.min()) < 0 or int(index.max()) >= B):
        raise ValueError(f"{name} must lie in [0, B={B}), got values in [{int(index.min())}, {int(index.max())}]")


def check_class_targets(name: str, target: torch.Tensor, n: int, k: int, ignore_index: int) -> None:
    if target.shape != (n,):
        raise ValueError(f"{name} must have shape [N] = ({n},), got {tuple(target.shape)}")
    if not values_checked():
        return
    kept = target[target != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= k):
        raise ValueError(
            f"{name} holds class ids outside [0, K={k}) (ignore_index={ignore_index}): "
            f"min {int(kept.min())}, max {int(kept.max())}"
        )


def check_linear_head(prefix: str, hidden, weight, bias, device) -> int:
    """Validate hidden [N, H], weight [K, H], bias [K]; returns K (H when weight is None)."""
    check_tensor(f"{prefix}hidden", hidden, ndim=2, floating=True)
    check_device(f"{prefix}hidden", hidden, device)
    if weight is None:
        if bias is not None:
            raise ValueError(f"{prefix}bias needs {prefix}weight (predictions are hidden itself without a head)")
        return hidden.shape[1]
    check_tensor(f"{prefix}weight", weight, ndim=2, floating=True)
    check_device(f"{prefix}weight", weight, device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{prefix}weight must have shape [K, H] with H = {hidden.shape[1]} (from hidden), got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, ndim=1, floating=True)
        check_device(f"{prefix}bias", bias, device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias must have shape [K] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    return weight.shape[0]


def check_task(m: int, task, M: int, B: int, present: torch.Tensor, mode: str, needs_index: bool) -> None:
    """docs/contract.md §5's checks for the task of modality m; names the task in every message."""
    name = f"tasks[{m}]"
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < M:
        raise ValueError(f"tasks keys must be modality indices in [0, M={M}), got {m!r}")
    if not isinstance(task, MaskedTask):
        raise TypeError(f"{name} must be a scale_fast.MaskedTask, got {type(task).__name__}")
    check_choice(f"{name}.kind", task.kind, TASK_KINDS)
    device = present.device
    k = check_linear_head(f"{name}.", task.hidden, task.weight, task.bias, device)
    n = task.hidden.shape[0]
    target = check_tensor(f"{name}.target", task.target)
    check_device(f"{name}.target", target, device)
    if task.kind == "ce":
        check_tensor(f"{name}.target", target, floating=False)
        check_class_targets(f"{name}.target", target, n, k, task.ignore_index)
    else:
        check_tensor(f"{name}.target", target, ndim=2, floating=True)
        if tuple(target.shape) != (n, k):
            raise ValueError(f"{name}.target must have shape [N, K] = {(n, k)}, got {tuple(target.shape)}")
    if task.kind == "nce":
        as_logit_scale(task.nce_scale, device, name=f"{name}.nce_scale")
    if task.sample_index is None:
        if needs_index and n:
            raise ValueError(
                f"{name}.sample_index is required in mode='sample' with harmonize=True "
                "(each row's weight is its sample's S'[b, m, m])"
            )
        return
    check_sample_index(f"{name}.sample_index", task.sample_index, n, B, device)
    if n and values_checked() and not bool(present[m, task.sample_index].all()):
        bad = task.sample_index[~present[m, task.sample_index]]
        raise ValueError(f"{name}.sample_index points at samples lacking modality {m}: {bad[:8].tolist()}")
