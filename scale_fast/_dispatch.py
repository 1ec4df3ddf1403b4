"""Backend selection: the one place where an op is routed to an implementation.

Every public op in :mod:`scale_fast.functional` validates its inputs, then calls
``get_op(backend, name)`` and runs what it returns.  A backend is a module that
exposes some of the functions below under these exact names; an op a backend
lacks falls back to the torch backend (the fallback is documented per op).

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
    Differentiable in e, logit_scale and row_weights.

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
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cpp")
_MODULES = {
    "torch": "scale_fast.backends.torch",
    "triton": "scale_fast.backends.triton.ops",
    "cpp": "scale_fast.backends.cpp",
}
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    """Import a backend module once; None (with the reason kept) when unavailable."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            ok = getattr(module, "is_available", lambda: True)()
            _loaded[name] = module if ok else None
            if not ok:
                _load_errors[name] = getattr(module, "unavailable_reason", lambda: "not available")()
        except ImportError as exc:  # e.g. triton not installed
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs compiled on CUDA tensors, and interpreted on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """Names of the backends that import on this machine (their devices aside)."""
    return [name for name in ("torch", "triton", "cpp") if _load(name) is not None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" (or SCALE_FAST_BACKEND) into a concrete backend for tensors on `device`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SCALE_FAST_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"SCALE_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        if device.type == "cuda" and _load("triton") is not None:
            return "triton"
        if device.type == "cpu" and _load("cpp") is not None and getattr(_load("cpp"), "preferred_on_cpu", False):
            return "cpp"
        return "torch"
    if backend != "torch":
        if _load(backend) is None:
            raise ValueError(
                f"backend={backend!r} is not available: {_load_errors.get(backend, 'unknown reason')}"
            )
        if backend == "triton" and not triton_runs_on(device):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported; got tensors on {device}"
            )
        if backend == "cpp" and device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only; got tensors on {device}")
    return backend


def get_op(backend: str, name: str) -> Callable:
    """The implementation of op `name` in a resolved backend, falling back to torch."""
    module = _load(backend)
    fn = getattr(module, name, None) if module is not None else None
    if fn is None:
        fn = getattr(_load("torch"), name)
    return fn
