"""How one fwd+bwd is measured: agreement, time and peak memory.

- time: median of repeats after warm-up; on CUDA each repeat is bracketed by CUDA events
  after a 256 MiB buffer is zeroed (the L2 cache is flushed, as in triton.testing.do_bench);
  on CPU perf_counter (wall) and process_time (CPU time of the process, which the load of
  other jobs does not inflate);
- peak memory: CUDA ``max_memory_allocated`` minus the allocation before the call; CPU the
  growth of the process's resident high-water mark (VmHWM, reset through
  /proc/self/clear_refs after the C allocator's free pages are handed back) over VmRSS
  before the call: in this process with glibc's mmap threshold pinned (every buffer above
  256 KiB is mapped and unmapped on its own, so the mark follows the live allocations:
  "peak alloc"), and in a fresh process with the default allocator settings (what a user's
  process grows by: "peak RSS"; ``fresh_process`` runs one and reads back what it reports);
- agreement: relative error (norm of the difference over the norm of the reference) of the
  loss and of every gradient against a reference run.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..backends._host_memory import release

L2_FLUSH_BYTES = 256 * 2 ** 20


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pin_malloc():
    """glibc: a fixed mmap threshold (no dynamic growth), so that freed big buffers leave the
    process and the high-water mark of one call sees each of them."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024)   # M_TRIM_THRESHOLD
    except Exception:  # noqa: BLE001 - not glibc: the measurement says what it can
        pass


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def peak_rss() -> Optional[int]:
    """This process's resident high-water mark (VmHWM) in bytes; None where /proc cannot say."""
    try:
        return _proc_status()["VmHWM"]
    except (OSError, KeyError):
        return None


def fresh_process(argv: Sequence[Any], *, env: Optional[Dict[str, str]] = None,
                  timeout: Optional[float] = None) -> dict:
    """Run `python *argv` in a new process and return the dict of the last JSON line it printed.

    A new process is what a user's process sees: its own allocator state, thread pools and
    mappings, none of this process's freed pages to reuse.  `env` adds to this environment.
    A failed child, or one that printed no JSON line, gives {"error": its exit status and the
    end of its stderr}."""
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"fresh process failed (rc={proc.returncode}): {proc.stderr.strip()[-300:] or 'no output'}"}
    return json.loads(lines[-1])


def peak_extra(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Peak extra bytes of one call of fn (None where this OS cannot measure it)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    # free pages the C allocator kept from earlier calls would be reused without raising the
    # mark: hand them back first, so the mark sees all of this call's memory
    release(torch.device("cpu"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                  # VmHWM := VmRSS
        before = _proc_status()["VmRSS"]
    except (OSError, KeyError):
        fn()
        return None
    fn()
    return max(0, _proc_status()["VmHWM"] - before)


def time_ms(fn: Callable[[], Any], device: str, *, reps: int, warmup: int) -> Dict[str, List[float]]:
    """{"wall": [ms per repeat], "cpu": [process CPU ms per repeat] (CPU only)}."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for k in range(reps):
            flush.zero_()
            starts[k].record()
            fn()
            ends[k].record()
        torch.cuda.synchronize()
        return {"wall": [s.elapsed_time(e) for s, e in zip(starts, ends)], "cpu": []}
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"wall": wall, "cpu": cpu}


def mm_gflops(shape, dtype, device: str, *, reps: int) -> Optional[float]:
    """GFLOP/s of torch.mm on (m x k) @ (k x n) (output capped at 2^26 elements)."""
    if shape is None:
        return None
    m, k, n = shape
    n = min(n, max(256, 2 ** 26 // max(m, 1)))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: torch.mm(a, b, out=c), device, reps=max(3, reps), warmup=1)["wall"])
    return 2.0 * m * k * n / (ms * 1e-3) / 1e9


def make_step(fn: Callable[[], torch.Tensor], inp: dict):
    """step() = one fwd+bwd of fn -> (loss, [gradient of each leaf]); step.clear() drops the gradients."""
    leaves = [inp[k] for k in inp["leaves"]]
    mod = inp.get("module")

    def clear():
        for t in leaves:
            t.grad = None
        if mod is not None:
            mod.zero_grad(set_to_none=True)

    def step():
        clear()
        loss = fn()
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]
    step.clear = clear
    return step


def cast_inputs(inp: dict, dtype: torch.dtype) -> dict:
    """A copy of the op's inputs with its float leaves (and module) in dtype."""
    import copy

    out = dict(inp)
    for k in inp["leaves"]:
        out[k] = inp[k].detach().to(dtype).requires_grad_(True)
    if "module" in inp:
        out["module"] = copy.deepcopy(inp["module"]).to(dtype)
    for k in inp.get("float_consts", ()):
        out[k] = inp[k].to(dtype)
    return out


def rel_err(x, ref) -> Optional[float]:
    if x is None or ref is None:
        return None
    x = torch.as_tensor(x).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    d = ref.norm().item()
    return (x - ref).norm().item() / d if d > 0 else (x - ref).norm().item()


def tolerance(dtype: torch.dtype) -> float:
    """Agreement needed before a row is timed (bench inputs are far from the tests' edge cases)."""
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3
