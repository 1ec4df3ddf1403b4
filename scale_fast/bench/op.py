"""What a benchmarked op declares: sizes, inputs, implementations and a reference."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Impl:
    """One implementation of an op: build(inputs) returns the loss closure of one forward."""
    name: str
    kind: str                                      # "scale_fast", "naive" or "peer"
    build: Optional[Callable[[dict], Callable[[], torch.Tensor]]] = None
    skip: Optional[str] = None                     # why it cannot run here
    ref: str = "default"                           # which reference it must agree with
    fits: Callable[[dict, str], Optional[str]] = lambda inp, device: None   # why these inputs are too big


@dataclass
class Op:
    name: str
    title: str
    xname: str                                     # the size swept ("B", "N")
    sizes: Dict[str, List[int]]                    # per tier: "quick" (small, anywhere), "cpu" (float32),
                                                   # "cuda" (bfloat16, larger)
    make_inputs: Callable[[int, str, str], dict]   # (size, device, tier) -> inputs, with "leaves"
    impls: Callable[[str], List[Impl]]             # (device) -> implementations
    reference: Dict[str, Callable[[dict], torch.Tensor]]
    describe: Callable[[str, str], str] = lambda tier, device: ""
    flops: Callable[[dict], Optional[float]] = lambda inp: None      # useful FLOPs of one fwd+bwd
    mm_shape: Callable[[dict], Optional[tuple]] = lambda inp: None   # the op's GEMM, for the torch.mm rate
    work: Optional[Callable[[dict], tuple]] = None                   # (unit, count): a "<unit>/s" column
    ref_dtype: Callable[[dict], torch.dtype] = lambda inp: torch.float64
    baseline: str = "naive"                        # ratios are against the first impl of this kind
    extra: dict = field(default_factory=dict)


def low_precision(device: str) -> torch.dtype:
    """The dtype of the benchmarks: bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 - a broken package counts as absent
        return False


def cuda_peer(module: str, pip: str, device: str) -> Optional[str]:
    """Why a CUDA-only peer cannot run here, or None."""
    if not installed(module):
        return f"not installed (pip install {pip})"
    if not device.startswith("cuda"):
        return "installed, but runs on CUDA tensors only"
    return None


def scale_fast_impls(device: str, build_for: Callable[[str], Callable], backends=None,
                     op: Optional[str] = None) -> List[Impl]:
    """One Impl per scale_fast backend, with the reason when one cannot run on `device`, or lacks
    the backend op `op` (the dispatcher would run the torch backend's code under its name)."""
    import scale_fast as sf
    from scale_fast._dispatch import capability

    out = []
    unavailable = sf.available_backends(with_reasons=True, build=True)  # builds the backends it measures
    for be in backends or sf.backend_names():
        name = f"scale_fast {be}"
        record = capability(be)
        lacks = op and record.lacks(op, torch.device(device))
        if unavailable[be]:
            out.append(Impl(name, "scale_fast", skip=f"backend not available here: {unavailable[be]}"))
        elif not record.measured(torch.device(device)):
            out.append(Impl(name, "scale_fast", skip=record.unmeasured_reason))
        elif lacks:
            out.append(Impl(name, "scale_fast", skip=f"{lacks} (the torch backend's code would run)"))
        else:
            out.append(Impl(name, "scale_fast", build_for(be)))
    return out


def memory_limit(device: str) -> int:
    """Bytes a naive baseline may need: 85% of free CUDA memory, on CPU 75% of MemAvailable (<= 12 GiB)."""
    if device.startswith("cuda"):
        return int(0.85 * torch.cuda.mem_get_info()[0])
    avail = 8 * 2 ** 30
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(12 * 2 ** 30, int(0.75 * avail))
