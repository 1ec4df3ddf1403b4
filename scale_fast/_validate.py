"""Input checks done once at the functional boundary, before any backend runs.

Each failure is a TypeError (wrong kind of thing) or ValueError (wrong shape,
range or option) whose message starts with the argument's name.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("sample", "batch")
FORMS = ("ntxent", "clip", "siglip")
REDUCTIONS = ("mean", "sum", "none")
TASK_KINDS = ("ce", "kl", "mse", "nce")
DEFAULT_MODALITIES = ("text", "image", "table", "video", "audio")  # SCALE's five, in the model's order
SKIP_FINITE_ENV = "SCALE_FAST_SKIP_FINITE_CHECK"


def values_checked() -> bool:
    """Checks that read tensor values (a host sync) are skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def as_flag(name: str, value) -> bool:
    """A bool option (True/False only: a tensor or a string here is a mistake, not a truth value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
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


def check_device(name: str, value: torch.Tensor, device: torch.device, reference: str = "embeddings") -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {reference} are on {device}")


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
    if tuple(present.shape) == (B, M) != (M, B):
        raise ValueError(f"embeddings must be [M, B, D] (modalities first), got shape {(M, B)} + [D] while present "
                         f"is [M, B] = {(B, M)}: the embeddings look like [B, M, D]; pass embeddings.transpose(0, 1)")
    if tuple(present.shape) != (M, B):
        raise ValueError(f"present must have shape [M, B] = {(M, B)}, got {tuple(present.shape)}")
    check_device("present", present, device)
    return present


def modality_names(modalities, M: int) -> Optional[Tuple[str, ...]]:
    """The names of the M modalities: `modalities` checked, or SCALE's five when M == 5 (else None)."""
    if modalities is None:
        return DEFAULT_MODALITIES if M == len(DEFAULT_MODALITIES) else None
    if isinstance(modalities, str) or not all(isinstance(n, str) for n in modalities):
        raise TypeError(f"modalities must be a sequence of names (str), got {modalities!r}")
    names = tuple(modalities)
    if len(names) != M or len(set(names)) != M:
        raise ValueError(f"modalities must be M={M} distinct names (one per row of embeddings), got {names}")
    return names


def modality_label(m: int, names: Optional[Sequence[str]]) -> str:
    return f"modality {m} ({names[m]!r})" if names else f"modality {m}"


def check_finite_rows(e: torch.Tensor, present: torch.Tensor, names: Optional[Sequence[str]] = None,
                      name: str = "embeddings") -> None:
    """A present row holding NaN or inf is an error: one reduction over e, one host read.

    Skipped while torch.compile traces, and when SCALE_FAST_SKIP_FINITE_CHECK=1 (for speed).
    """
    if not values_checked() or os.environ.get(SKIP_FINITE_ENV, "") not in ("", "0"):
        return
    bad = torch.isfinite(e).all(dim=-1).logical_not_().logical_and_(present).flatten()
    first = int(torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1))
    if first >= 0:
        m, b = divmod(first, e.shape[1])
        raise ValueError(f"{name}[{m}, {b}] ({modality_label(m, names)}, sample {b}) is present but not finite: "
                         f"mark it absent in present or fix the input ({SKIP_FINITE_ENV}=1 skips this check)")


def _as_scalar(value, device: torch.device, name: str, kinds: str):
    """(0-dim tensor, its float value or None while torch.compile traces) of a float or 0-dim float tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=device), float(value)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    check_device(name, value, device)
    return value.reshape(()), (float(value.detach()) if values_checked() else None)


def as_logit_scale(logit_scale, device: torch.device, name: str = "logit_scale") -> torch.Tensor:
    """A 0-dim float tensor > 0 (a float becomes a constant tensor)."""
    tensor, value = _as_scalar(logit_scale, device, name, "a float or a 0-dim float tensor")
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return tensor


def as_logit_bias(logit_bias, form: str, device: torch.device) -> torch.Tensor | None:
    """None (no bias) or a 0-dim finite float tensor; only form="siglip" takes a bias."""
    if logit_bias is None:
        return None
    if form != "siglip":
        raise ValueError(f"logit_bias applies to form='siglip' only, got form={form!r}")
    tensor, value = _as_scalar(logit_bias, device, "logit_bias", "None, a float or a 0-dim float tensor")
    if value is not None and not math.isfinite(value):
        raise ValueError(f"logit_bias must be finite, got {value}")
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
    keep = target != ignore_index
    # ignored rows read as class 0 (a valid id when K >= 1): the usual, valid case needs no gather
    # of the kept rows, which costs more than the loss itself when K is small and N large
    if n and k and all(0 <= int(v) < k for v in torch.where(keep, target, 0).aminmax()):
        return
    kept = target[keep]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= k):
        raise ValueError(
            f"{name} holds class ids outside [0, K={k}) (ignore_index={ignore_index}): "
            f"min {int(kept.min())}, max {int(kept.max())}"
        )


def check_linear_head(prefix: str, hidden, weight, bias, device, reference: str = "embeddings") -> int:
    """Validate hidden [N, H], weight [K, H], bias [K]; returns K (H when weight is None)."""
    check_tensor(f"{prefix}hidden", hidden, ndim=2, floating=True)
    check_device(f"{prefix}hidden", hidden, device, reference)
    if weight is None:
        if bias is not None:
            raise ValueError(f"{prefix}bias needs {prefix}weight (predictions are hidden itself without a head)")
        return hidden.shape[1]
    check_tensor(f"{prefix}weight", weight, ndim=2, floating=True)
    check_device(f"{prefix}weight", weight, device, reference)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{prefix}weight must have shape [K, H] with H = {hidden.shape[1]} (from hidden), got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, ndim=1, floating=True)
        check_device(f"{prefix}bias", bias, device, reference)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias must have shape [K] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    return weight.shape[0]


def task_index(key, M: int, names: Optional[Sequence[str]]) -> int:
    """A tasks key: a modality index in [0, M) or one of the modality names."""
    if isinstance(key, str):
        if names is None:
            raise ValueError(f"tasks key {key!r} is a modality name, but the M={M} modalities have no names: "
                             f"pass modalities=[...] (one name per row of embeddings) or use indices")
        if key not in names:
            raise ValueError(f"tasks key {key!r} is not one of the modalities {tuple(names)}")
        return list(names).index(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < M:
        raise ValueError(f"tasks keys must be modality indices in [0, M={M}) or modality names, got {key!r}")
    return key


def check_task_fields(prefix: str, task, device: Optional[torch.device] = None) -> None:
    """The structure of a masked task (kind, dtypes, shapes, devices), without reading values.

    Run when a MaskedTask is made (prefix "MaskedTask.", devices against hidden's) and again when
    a loss uses it (prefix "tasks[m].", devices against the embeddings').
    """
    check_choice(f"{prefix}kind", task.kind, TASK_KINDS)
    check_tensor(f"{prefix}hidden", task.hidden, ndim=2, floating=True)
    reference = "embeddings"
    if device is None:
        device, reference = task.hidden.device, f"{prefix}hidden"
    k = check_linear_head(prefix, task.hidden, task.weight, task.bias, device, reference)
    n = task.hidden.shape[0]
    target = check_tensor(f"{prefix}target", task.target)
    check_device(f"{prefix}target", target, device, reference)
    if task.kind == "ce":
        check_tensor(f"{prefix}target", target, floating=False)
        if tuple(target.shape) != (n,):
            raise ValueError(f"{prefix}target must have shape [N] = ({n},), got {tuple(target.shape)}")
    else:
        check_tensor(f"{prefix}target", target, ndim=2, floating=True)
        if tuple(target.shape) != (n, k):
            raise ValueError(f"{prefix}target must have shape [N, K] = {(n, k)}, got {tuple(target.shape)}")
    if task.sample_index is not None:
        check_tensor(f"{prefix}sample_index", task.sample_index, ndim=1, floating=False)
        check_device(f"{prefix}sample_index", task.sample_index, device, reference)
        if task.sample_index.shape[0] != n:
            raise ValueError(f"{prefix}sample_index must have one entry per row ({n}), got {task.sample_index.shape[0]}")
    if isinstance(task.ignore_index, bool) or not isinstance(task.ignore_index, int):
        raise TypeError(f"{prefix}ignore_index must be an int, got {type(task.ignore_index).__name__}")
    if isinstance(task.nce_scale, bool) or not isinstance(task.nce_scale, (int, float, torch.Tensor)):
        raise TypeError(f"{prefix}nce_scale must be a float or a 0-dim float tensor, got {type(task.nce_scale).__name__}")


def check_task(m: int, task, M: int, B: int, present: torch.Tensor, mode: str, needs_index: bool) -> None:
    """docs/contract.md §5's checks for the task of modality m (an index); names the task in every message."""
    name = f"tasks[{m}]"
    task_index(m, M, None)
    if not hasattr(task, "hidden") or not hasattr(task, "kind"):
        raise TypeError(f"{name} must be a scale_fast.MaskedTask, got {type(task).__name__}")
    device = present.device
    check_task_fields(f"{name}.", task, device)
    n = task.hidden.shape[0]
    if task.kind == "ce":
        k = task.hidden.shape[1] if task.weight is None else task.weight.shape[0]
        check_class_targets(f"{name}.target", task.target, n, k, task.ignore_index)
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
