"""Triton kernels: the "triton" backend.

Each op lives in its own module with its kernels and its autograd.Function;
``scale_fast.backends.triton.ops`` exposes them under the names of the backend contract
in ``scale_fast/_dispatch.py``.  This package declares the backend without importing
triton (the dispatcher imports ``ops`` once triton imports).  The kernels run on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported
(how the test suite runs them without a GPU).
"""
from __future__ import annotations

import importlib
import os

import torch

from .._capability import Capability

# The fused scores kernel holds a sample's padded [M, M] block in registers (scores.py).
MAX_MODALITIES = 16

_import_error: list = []


def interpreted() -> bool:
    """True when triton interprets the kernels on CPU (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when triton imports and there is a device for it (CUDA, or the interpreter on CPU)."""
    if not _import_error:
        try:
            importlib.import_module("triton")
            _import_error.append("")
        except ImportError as exc:
            _import_error.append(f"triton does not import ({type(exc).__name__}: {exc})")
    return not unavailable_reason()


def unavailable_reason() -> str:
    if _import_error and _import_error[0]:
        return _import_error[0]
    if not torch.cuda.is_available() and not interpreted():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to interpret the kernels on CPU)"
    return ""


CAPABILITY = Capability(
    name="triton",
    module="scale_fast.backends.triton.ops",
    devices=("cuda", "cpu") if interpreted() else ("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    ops=("scores", "contrastive", "siglip", "info_nce", "linear_cross_entropy"),
    row_range_ops=("contrastive",),  # a process group runs the fused kernel on its local rows
    max_modalities={"scores": MAX_MODALITIES},
    preferred_on=("cuda",),
    is_available=is_available,
    unavailable_reason=unavailable_reason,
    device_hint="triton runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported",
    measured_on=("cuda",),
    unmeasured_reason="CUDA only (TRITON_INTERPRET emulation is not a measurement)",
)
