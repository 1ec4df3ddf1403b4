"""What a backend declares about itself: the record ``scale_fast._dispatch`` chooses from.

Each backend package (``scale_fast/backends/<name>/__init__.py``) declares one ``Capability``
named ``CAPABILITY``.  Declaring it imports nothing heavy (no triton, no compiler): the
dispatcher reads every record to answer ``available_backends()`` and ``explain_backend()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple

import torch


def _always() -> bool:
    return True


def _no_reason() -> str:
    return ""


@dataclass(frozen=True)
class Capability:
    """A backend's declared reach.

    name: the backend name users pass (backend="...").
    module: the module holding the ops under the contract names of scale_fast/_dispatch.py
        (imported only once the backend is available).
    devices: device types its kernels run on ("cpu", "cuda"; "*": any).
    dtypes: floating input dtypes it has kernels for (others go to the torch backend).
    ops: the contract ops it implements (others go to the torch backend).
    row_range_ops: ops that accept ``row_range`` (this rank's rows against every column,
        the process-group path of scale_fast/distributed.py).
    constant_columns_ops: row_range ops that also take ``columns_grad=False`` (the columns are
        constants: a gather without gradient).
    max_modalities: {op: largest M it handles} (larger M goes to the torch backend).
    preferred_on: device types where backend="auto" picks it (the first preferred available
        backend in registry order wins; torch is the last resort everywhere).
    is_available / unavailable_reason: whether it can run on this machine now, and why not
        (is_available may do the work a first use does: the cpp build).
    pending_reason: what that first use would still do ("" when nothing), without doing it: the
        reports (available_backends, explain_backend) read it instead of calling is_available.
    device_hint: how to run it where its devices exclude the tensors' ("" when nothing helps), added
        to the error of an explicit backend=... there.
    measured_on: device types where its timings measure its kernels ("*": any); elsewhere (e.g. an
        emulation) the benchmarks skip it, saying unmeasured_reason.
    """

    name: str
    module: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    ops: Tuple[str, ...]
    row_range_ops: Tuple[str, ...] = ()
    constant_columns_ops: Tuple[str, ...] = ()
    max_modalities: Mapping[str, int] = field(default_factory=dict)
    preferred_on: Tuple[str, ...] = ()
    is_available: Callable[[], bool] = _always
    unavailable_reason: Callable[[], str] = _no_reason
    pending_reason: Callable[[], str] = _no_reason
    device_hint: str = ""
    measured_on: Tuple[str, ...] = ("*",)
    unmeasured_reason: str = ""

    def lacks(self, op: str, device: torch.device, dtype: Optional[torch.dtype] = None,
              modalities: Optional[int] = None, row_range: bool = False, columns_grad: bool = True) -> str:
        """Why this backend cannot run `op` on these inputs ("" when it can); availability aside."""
        if op not in self.ops:
            return f"{self.name} has no {op} op"
        if "*" not in self.devices and device.type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype is not None and dtype not in self.dtypes:
            return f"{self.name} has no {str(dtype).replace('torch.', '')} kernels"
        limit = self.max_modalities.get(op)
        if modalities is not None and limit is not None and modalities > limit:
            return f"{self.name} {op} handles M <= {limit}, got M={modalities}"
        if row_range and op not in self.row_range_ops:
            return f"{self.name} {op} has no row_range (local rows x global columns) form"
        if not columns_grad and op not in self.constant_columns_ops:
            return f"{self.name} {op} has no row_range form with constant columns"
        return ""

    def measured(self, device: torch.device) -> bool:
        """Whether its timings on `device` measure its kernels (see measured_on)."""
        return "*" in self.measured_on or device.type in self.measured_on
