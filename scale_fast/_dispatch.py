"""Backend selection: the one place where an op is routed to an implementation.

Every public op in :mod:`scale_fast.functional` validates its inputs, resolves the
requested backend once (``resolve_backend``: "auto" -> the preferred available backend
for the device; an explicit name that cannot run there -> ValueError), then calls
``get_op(backend, name, *args)`` and runs what it returns.  Each backend package
declares a ``Capability`` record (scale_fast/backends/_capability.py): devices, dtypes,
ops, row_range ops, largest M, preferred devices, availability.  ``get_op`` reads the
record and falls back to the torch backend (which implements everything) when the
chosen backend lacks the op or these inputs' dtype, M or row_range form;
``explain_backend`` says which backend runs and why, in one line.  No backend
falls back by itself.

Backend op contracts (inputs are already validated; backends trust them):

``scores(e, present, mode) -> (S, S_prime, active)``
    e: [M, B, D] float raw embeddings; rows of absent modalities may hold
    anything (NaN): the op normalises present rows itself (z = e / max(||e||,
    1e-12), see scale_fast/_normalize.py) and gives absent rows exactly 0
    gradient.  Taking e rather than a normalised copy lets a backend avoid
    keeping an extra [M, B, D] tensor.  present: [M, B] bool.  mode: "sample" | "batch".
    S, S_prime: [B, M, M] (sample) or [M, M] (batch), float32 (float64 for
    float64 e); active: [M, M] bool (|P_ij| >= 1).  Differentiable in e.

``contrastive(e, present, logit_scale, row_weights, form) -> pair_losses``
    e, present as above.  logit_scale: 0-dim float tensor (may require grad).
    row_weights: None (all 1) or [B, M, M] float tensor (may require grad); the
    weight of a row of sample b in pair (i, j) is row_weights[b, i, j].
    form: "ntxent" | "clip".  Returns [M, M] float32 (float64 for float64 z):
    L(i, j) in the upper triangle for active pairs, exactly 0 elsewhere.
    Differentiable in e, logit_scale and row_weights.  Backends whose record lists
    it in ``row_range_ops`` take a sixth argument row_range=(start, stop): e holds
    the global batch and only the terms of the rows of samples start..stop-1 are
    summed, over the global normaliser (scale_fast/backends/_allpairs.py); those whose record
    lists it in ``constant_columns_ops`` also take ``columns_grad=False``: only those rows, as
    queries, get a gradient (a gather without gradient).  Every modality op (scores,
    contrastive, siglip) takes ``normalize=False``: the present rows are used as given (no
    normalisation, no projection of the gradient); the pair ops then need rows of norm <= 1
    (their logits are bounded by |s w|: scale_fast/_normalize.py within_unit_ball).

``siglip(e, present, logit_scale, logit_bias, row_weights) -> pair_losses``
    The sigmoid (SigLIP) form of ``contrastive`` (docs/contract.md §4): logit_bias a
    0-dim float tensor (may require grad), the rest and the optional row_range as there.
    Differentiable in e, logit_scale, logit_bias and row_weights.

``linear_cross_entropy(hidden, weight, target, bias, scale, ignore_index, reduction)``
    hidden: [N, H]; weight: [K, H]; target: [N] int64 (class index or
    ignore_index) or [N, K] float (probabilities); bias: None or [K];
    scale: None or [N] float; reduction: "mean" | "sum" | "none".
    Returns the loss of F.cross_entropy(scale[:, None] * (hidden @ weight.T + bias),
    target) with that reduction, float32 (float64 for float64 hidden), never
    storing [N, K].  "mean" over zero non-ignored rows is 0.  Differentiable in
    hidden, weight, bias, scale and float targets.

``info_nce(a, b, row_weights, scale) -> loss``
    a, b: [N, F] L2-normalised rows; row_weights: None or [N]; scale: float.
    mean_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_n), 0-dim float32/float64.

``info_nce_rows(a, b, row_weights, scale, offset) -> sum``
    The row-block form under a process group: a [R, F] this rank's rows, b [N, F]
    every rank's; sum_n (LSE_k s w_n a_n . b_k - s w_n a_n . b_(offset+n)).
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .backends import NAMES
from .backends._capability import Capability

BACKENDS = ("auto",) + NAMES
FALLBACK = "torch"  # implements every op on every device and dtype
# Every backend's record, read at import (its package imports no triton and builds nothing), and
# the op modules already imported with it: a lookup while torch.compile traces must not import.
_records: Dict[str, Capability] = {name: importlib.import_module(f"scale_fast.backends.{name}").CAPABILITY
                                   for name in NAMES}
_ops: Dict[str, ModuleType] = {name: sys.modules[record.module] for name, record in _records.items()
                               if record.module in sys.modules}
# the ops whose first argument is an [M, B, D] embedding tensor (M: the modality count)
_MODALITY_OPS = ("scores", "contrastive", "siglip")


def backend_names() -> Tuple[str, ...]:
    """Every backend the library has, whether or not it can run here: ("torch", "triton", "cpp")."""
    return NAMES


def capability(name: str) -> Capability:
    """The declared record of backend `name` (scale_fast/backends/<name>/__init__.py)."""
    return _records[name]


def _readiness(name: str, build: bool) -> Tuple[str, str]:
    """(why backend `name` cannot run here, "" when it can; what its first use still does, "" if nothing).

    build=False (the reports) never starts that work (the cpp build): a backend waiting for it comes back
    as ("", why it waits); build=True (running an op) does the work, after which it is ready or not.
    """
    record = capability(name)
    if not build:
        pending = record.pending_reason()
        if pending:
            return "", pending
    if record.is_available():
        return "", ""
    return record.unavailable_reason() or "not available", ""


def available_backends(with_reasons: bool = False, build: bool = False) -> Union[List[str], Dict[str, str]]:
    """The backends that can run on this machine now.

    with_reasons=False: their names.  with_reasons=True: {name: "" if it can run, else why
    not} for every backend (e.g. triton without CUDA and without TRITON_INTERPRET=1).
    Asking never compiles: an unbuilt cpp backend is reported as not built yet (it builds on first
    use); build=True builds it first (what a first use would do), e.g. before a benchmark.
    """
    reasons = {}
    for name in NAMES:
        why, pending = _readiness(name, build)
        reasons[name] = why or pending
    return reasons if with_reasons else [name for name, why in reasons.items() if not why]


def _ops_module(name: str) -> ModuleType:
    if name not in _ops:
        _ops[name] = importlib.import_module(capability(name).module)
    return _ops[name]


def _auto(device: torch.device, build: bool) -> Tuple[str, str]:
    """(backend, why) for backend="auto" on `device` (build: as in _readiness)."""
    skipped = []
    for name in NAMES:
        record = capability(name)
        if device.type not in record.preferred_on:
            continue
        why, pending = _readiness(name, build)
        why = why or record.lacks(record.ops[0], device)
        if not why:
            return name, f"backend='auto' prefers {name} on {device.type}" + (f" ({pending})" if pending else "")
        skipped.append(f"{name}: {why}")
    if skipped:
        return FALLBACK, f"backend='auto' uses {FALLBACK} on {device.type} ({'; '.join(skipped)})"
    return FALLBACK, f"backend='auto' uses {FALLBACK} on {device.type} (no backend is preferred there)"


def _resolve(backend: str, device: torch.device, build: bool = True) -> Tuple[str, str]:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SCALE_FAST_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"SCALE_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        return _auto(device, build)
    why, pending = _readiness(backend, build)
    if why:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    record = capability(backend)
    if "*" not in record.devices and device.type not in record.devices:
        hint = f" ({record.device_hint})" if record.device_hint else ""
        raise ValueError(f"backend={backend!r} runs on {'/'.join(record.devices)} tensors only; "
                         f"got tensors on {device}{hint}")
    return backend, f"backend={backend!r} requested" + (f" ({pending})" if pending else "")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" (or SCALE_FAST_BACKEND) into a concrete backend for tensors on `device`.

    An explicit backend that is unavailable, or does not run on `device`, is a ValueError.
    """
    return _resolve(backend, device)[0]


def _features(name: str, args) -> Tuple[torch.device, Optional[torch.dtype], Optional[int]]:
    """(device, float dtype, M) of an op's inputs, as the records are declared over them."""
    tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = None
    for d in floats:
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    modalities = tensors[0].shape[0] if name in _MODALITY_OPS and tensors else None
    return tensors[0].device, dtype, modalities


def _choose(backend: str, name: str, args, row_range: bool, columns_grad: bool = True) -> Tuple[str, str]:
    """(backend that runs op `name` on `args`, why not the resolved `backend`; "" when it does)."""
    device, dtype, modalities = _features(name, args)
    lacks = capability(backend).lacks(name, device, dtype, modalities, row_range, columns_grad)
    return (FALLBACK, lacks) if lacks else (backend, "")


def get_op(backend: str, name: str, *args, row_range: bool = False, columns_grad: bool = True) -> Callable:
    """The implementation of op `name` for inputs `args` (only their device, dtype and M are read).

    backend is a resolved name; where its record lacks the op or these inputs, the torch
    backend's op is returned.  row_range=True: the caller passes a row_range argument;
    columns_grad=False: and columns_grad=False (constant columns).
    """
    return getattr(_ops_module(_choose(backend, name, args, row_range, columns_grad)[0]), name)


def explain_backend(op: str, *inputs, backend: str = "auto", row_range: bool = False) -> str:
    """One line: which backend runs `op` on these inputs, and why (never compiles: an unbuilt cpp
    backend is named with a note that its first use builds it).

    inputs: the op's leading tensor arguments as the backend contract takes them (the [M, B, D]
    embeddings for "scores" / "contrastive", hidden and weight for "linear_cross_entropy",
    a and b for "info_nce"); e.g. ``sf.explain_backend("contrastive", torch.randn(3, 8, 4))``.
    """
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise TypeError("explain_backend needs the op's input tensors after the op name")
    device, dtype, modalities = _features(op, inputs)
    where = f"{op}[{device.type}, {str(dtype).replace('torch.', '')}" + (
        f", M={modalities}]" if modalities is not None else "]")
    try:
        resolved, why = _resolve(backend, device, build=False)
    except ValueError as exc:
        return f"{where} -> error: {exc}"
    chosen, lacks = _choose(resolved, op, inputs, row_range)
    if lacks:
        return f"{where} -> {chosen}: {why}, but {lacks}, so {chosen} runs it"
    return f"{where} -> {chosen}: {why}"
