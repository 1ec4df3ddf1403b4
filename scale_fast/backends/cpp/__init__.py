"""The "cpp" backend: compiled CPU kernels (csrc/*.cpp) for the fused ops.

Importing this module compiles nothing, nor do ``sf.available_backends()`` and
``sf.explain_backend()`` (they report an unbuilt backend as not built yet); ``is_available()``
(called by the dispatcher the first time an op runs on backend "cpp", or "auto" on CPU) JIT-builds the extension with torch.utils.cpp_extension (ninja + pybind11) into a
cache directory, see ``_build``.  A failed build gives one RuntimeWarning and leaves the
backend unavailable: "auto" then uses the torch backend, and backend="cpp" raises
ValueError with the reason.

Ops (``ops.py``, backend contracts in scale_fast/_dispatch.py): ``contrastive`` (all-pairs NT-Xent /
CLIP with row weights, logit-scale gradient, absent samples), ``siglip`` (the sigmoid form,
with logit-bias gradient and the row_range form of the process-group path), ``linear_cross_entropy``
(masked-token linear cross-entropy, class ids or probabilities, row scales, bias),
``info_nce`` (the "nce" masked task) and ``scores`` (per-sample Gram in C++, the
[B, M, M] softmax / harmonisation shared, scale_fast/backends/_scores.py).

``CAPABILITY.preferred_on == ("cpu",)``: "auto" routes CPU tensors here when the build succeeded.  Set from
benchmarks/bench_cpp.py (benchmarks/results/cpp_cpu.md, 1 thread, both backends interleaved):
backend="cpp" beats backend="torch" on both benchmark ops with less peak memory --
scale_loss (B=4096, M=5, D=256) 1.37-1.55x, linear_cross_entropy (N=8192, K=21128, H=768)
1.15-1.36x over four runs on a shared 2-core EPYC (that op is GEMM-bound in both backends).
"""
from __future__ import annotations

import torch

from .._capability import Capability
from . import _build, ops  # ops imports nothing heavy and compiles nothing


def is_available() -> bool:
    """True when the extension is loaded (building it now if it was not tried yet)."""
    return _build.extension() is not None


def unavailable_reason() -> str:
    return _build.reason()


def extension():
    """The compiled module (None when unavailable)."""
    return _build.extension()


# Inputs of every float dtype are accumulated in float32 (float64 in float64) by the kernels.
CAPABILITY = Capability(
    name="cpp",
    module=ops.__name__,
    devices=("cpu",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    ops=("scores", "contrastive", "siglip", "info_nce", "linear_cross_entropy"),
    row_range_ops=("siglip",),  # its row-block form needs only the siglip kernels
    constant_columns_ops=("siglip",),
    preferred_on=("cpu",),
    is_available=is_available,
    unavailable_reason=unavailable_reason,
    pending_reason=_build.pending,  # "not built yet" without building (available_backends, explain_backend)
    measured_on=("cpu",),
    unmeasured_reason="CPU tensors only",
)


__all__ = ["CAPABILITY", "is_available", "unavailable_reason", "extension"]
