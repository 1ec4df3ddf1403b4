"""Shared helpers of the scale_fast benchmarks (liger-kernel style: one script per op).

- timing: CPU = median of repeats after warm-up (time.perf_counter); CUDA = median of
  CUDA-event timings after warm-up (like triton.testing.do_bench, with an adaptive
  number of repeats bounded by a time budget);
- peak EXTRA memory of one fwd+bwd: CUDA = torch.cuda.max_memory_allocated() minus the
  allocation before the call (after reset_peak_memory_stats); CPU = growth of the
  process's resident-set high-water mark (VmHWM reset through /proc/self/clear_refs,
  minus VmRSS before the call), each CPU case in a fresh subprocess;
- machine / versions / date header, markdown + CSV writer (benchmarks/results/),
  matmul-rate measurement (torch.mm on the op's GEMM shapes, in the same run);
- a small driver that runs the cases of a script in child processes (one per case on
  CPU, all cases in one process on CUDA, restarted after a fatal CUDA error), under an
  overall time budget, recording every failure instead of aborting.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ------------------------------------------------------------------ imports
def import_scale_fast():
    """Import scale_fast: the installed package first, else the source tree."""
    try:
        import scale_fast as sf  # noqa: F401
        return sf
    except ImportError:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        for name in [m for m in sys.modules if m == "scale_fast" or m.startswith("scale_fast.")]:
            del sys.modules[name]
        import scale_fast as sf  # noqa: F811
        return sf


def try_import_scale_fast():
    try:
        return import_scale_fast(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ machine info
def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cmd(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable ({type(exc).__name__})"
    sf, err = try_import_scale_fast()
    info["scale_fast"] = getattr(sf, "__version__", "unknown") if sf is not None else f"not importable ({err})"
    info["git_commit"] = _cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]) or "none"
    try:
        mem = [l for l in open("/proc/meminfo") if l.startswith("MemTotal")][0].split()[1]
        info["ram_gib"] = round(int(mem) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2 ** 30, 1)
        info["gpu_sms"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
        info["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown"
    for pkg in ("open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy"):
        v = _pkg_version(pkg)
        if v:
            info[pkg] = v
    return info


def device_tag(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    for key in ("H100", "H200", "A100", "B200", "L40", "L4", "A10", "V100", "T4"):
        if key in name:
            return key.lower()
    return "cuda"


def header_markdown(title: str, info: dict[str, Any], command: str) -> str:
    lines = [f"# {title}", ""]
    lines.append(f"- date: {info['date_utc']}")
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} ({info.get('gpu_mem_gib')} GiB, {info.get('gpu_sms')} SMs), "
                     f"driver {info.get('driver')}, CUDA {info.get('cuda')}")
    lines.append(f"- CPU: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}"
                 + (f", {info['ram_gib']} GiB RAM" if "ram_gib" in info else ""))
    lines.append(f"- versions: python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
                 f"scale_fast {info['scale_fast']} (git {info['git_commit']})")
    peers = [f"{k} {info[k]}" for k in ("open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy") if k in info]
    if peers:
        lines.append(f"- peers: {', '.join(peers)}")
    lines.append(f"- os: {info['os']}; load average (1/5/15 min) at start: {info.get('loadavg')}"
                 + (f", at end: {info['loadavg_end']}" if info.get("loadavg_end") else ""))
    lines.append(f"- command: `{command}`")
    try:
        load0 = float(str(info.get("loadavg", "0")).split()[0])
    except ValueError:
        load0 = 0.0
    if info.get("device") == "cpu" and load0 > 0.75 * (info.get("cpu_cores") or 1):
        lines.append("- **caution**: other jobs shared this machine (see the load average; the `load` column is "
                     "the 1-minute load when each row started): absolute times are inflated and ratios between "
                     "rows measured minutes apart are noisy")
    if info.get("note"):
        lines.append(f"- note: {info['note']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ timing
def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cpu(fn: Callable[[], Any], *, reps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls (after `warmup` untimed ones)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cuda(fn: Callable[[], Any], *, reps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls, CUDA events around each call, L2 flushed
    before each as in triton.testing.do_bench."""
    cache = torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for k in range(reps):
        cache.zero_()
        starts[k].record()
        fn()
        ends[k].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def adaptive_reps(first_ms: float, budget_s: float, *, min_reps: int = 1, max_reps: int = 10) -> int:
    if first_ms <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, math.floor(budget_s * 1e3 / first_ms))))


# ------------------------------------------------------------------ memory
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _proc_status()
    except OSError:
        return False


def peak_extra_cpu(fn: Callable[[], Any]) -> tuple[int, Any, float]:
    """(peak extra bytes, fn's result, ms): VmHWM growth over VmRSS before the call.
    Meant for a fresh process whose earlier allocations were small (glibc returns large
    blocks to the OS, so the high-water mark sees every big buffer of the call)."""
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset VmHWM to the current VmRSS
    before = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    res = fn()
    ms = (time.perf_counter() - t0) * 1e3
    peak = _proc_status()["VmHWM"]
    return max(0, peak - before), res, ms


def peak_extra_cuda(fn: Callable[[], Any]) -> tuple[int, Any, float]:
    import gc
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    res = fn()
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return max(0, peak - before), res, start.elapsed_time(end)


def free_device_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def measure_step(step: Callable[[], Any], *, device: str, budget_s: float, deadline: float,
                 max_reps: int = 10, warm: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Warm up, measure the peak extra memory of one call of `step` (a full fwd+bwd that
    returns (loss, grads)), then time it.  Returns dict(result, peak_bytes, times_ms, note)."""
    note = []
    if device.startswith("cuda"):
        step()                                   # compile / autotune / allocator warm-up
        torch.cuda.synchronize()
        if hasattr(step, "clear"):
            step.clear()                         # free the warm-up's gradients: they count as extra
        peak, res, first_ms = peak_extra_cuda(step)
    else:
        if warm is not None:
            warm()                               # tiny shapes: library init, thread pools
        if cpu_peak_supported():
            peak, res, first_ms = peak_extra_cpu(step)
        else:
            t0 = time.perf_counter()
            res = step()
            first_ms, peak = (time.perf_counter() - t0) * 1e3, -1
            note.append("no VmHWM reset: memory not measured")
    left = deadline - time.time()
    budget = min(budget_s, max(0.0, left - 5.0))
    if budget * 1e3 < first_ms:
        times = [first_ms]
        note.append("1 sample (the memory-measured first call)")
    else:
        reps = adaptive_reps(first_ms, budget, max_reps=max_reps)
        times = (time_cuda(step, reps=reps) if device.startswith("cuda") else time_cpu(step, reps=reps))
    return {"result": res, "peak_bytes": peak, "times_ms": times, "note": "; ".join(note)}


# ------------------------------------------------------------------ matmul rate
def mm_rate(m: int, k: int, n: int, *, dtype: torch.dtype, device: str, budget_s: float,
            max_out_elems: int | None = None) -> dict[str, Any]:
    """GFLOP/s of torch.mm (m x k) @ (k x n) into a preallocated output; n is capped so
    that the output holds at most max_out_elems (the rate has long saturated there)."""
    if max_out_elems is not None and m * n > max_out_elems:
        n = max(256, max_out_elems // m)
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    reps = adaptive_reps(first, budget_s, min_reps=2, max_reps=20)
    times = time_cuda(fn, reps=reps) if device.startswith("cuda") else time_cpu(fn, reps=reps)
    ms = statistics.median(times)
    return {"shape": f"({m}x{k})@({k}x{n})", "ms": ms, "gflops": 2.0 * m * k * n / (ms * 1e-3) / 1e9,
            "reps": reps}


# ------------------------------------------------------------------ agreement
def rel_err(x: torch.Tensor | float | None, ref: torch.Tensor | float | None) -> float | None:
    if x is None or ref is None:
        return None
    if not torch.is_tensor(x):
        x = torch.tensor(float(x))
    if not torch.is_tensor(ref):
        ref = torch.tensor(float(ref))
    x = x.detach().double()                      # on x's device (the GPU for big gradients)
    ref = ref.detach().to(device=x.device).double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def grads_rel_err(grads, ref_grads) -> float | None:
    if not grads or not ref_grads or len(grads) != len(ref_grads):
        return None
    errs = [rel_err(g, r) for g, r in zip(grads, ref_grads) if g is not None and r is not None]
    return max(errs) if errs else None


def save_ref(path: Path, loss, grads):
    torch.save({"loss": float(loss), "grads": [None if g is None else g.detach().float().cpu() for g in grads]},
               path)


def load_ref(path: Path):
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ tables
def fmt(v: Any, digits: int = 3) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}"
    return str(v)


def md_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(out) + "\n"


def write_results(name: str, tag: str, text: str, csv_rows: list[dict[str, Any]], out_dir: Path | None = None):
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}_{tag}.md"
    md.write_text(text)
    cs = out_dir / f"{name}_{tag}.csv"
    keys: list[str] = []
    for r in csv_rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in csv_rows:
            w.writerow({k: r.get(k) for k in keys})
    return md, cs


# ------------------------------------------------------------------ driver
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true",
                   help="build and run every case of the chosen device's table at tiny sizes on CPU "
                        "(backend torch stands in for triton, CUDA-only peers are recorded as skipped)")
    p.add_argument("--budget-s", type=float, default=None, help="overall wall-clock budget of the table")
    p.add_argument("--case-budget-s", type=float, default=None, help="timing budget of one case")
    p.add_argument("--out-dir", default=None, help="where the .md/.csv go (default benchmarks/results)")
    p.add_argument("--note", default=None, help="a line of context written into the table's header")
    p.add_argument("--only", default=None, help="comma-separated impl names to run (others skipped)")
    p.add_argument("--threads", default=None,
                   help="torch CPU threads (default: torch's default). On a shared, loaded machine use 1: "
                        "OpenMP threads that spin-wait for a busy core make multi-threaded timings meaningless. "
                        "'auto': the cores that the 1-minute load average leaves free, at least 1")
    # internal (child processes)
    p.add_argument("--child-start", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-end", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-results", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-refdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def resolve_device(args) -> str:
    if getattr(args, "threads", None):
        if args.threads == "auto" and args.child_start is None:
            # decided once, in the parent, and handed to the children as a number
            args.threads = str(max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0])))
        if args.threads != "auto":
            torch.set_num_threads(int(args.threads))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _is_fatal_cuda(exc: BaseException) -> bool:
    msg = str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg:
        return False
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def child_main(args, cases: list[dict], run_case: Callable[[dict, Any, dict], dict]):
    """Run cases[args.child_start: args.child_end] in this process, appending one JSON line
    per case to args.child_results.  Exit code 3 after a fatal (non-OOM) CUDA error."""
    ctx: dict[str, Any] = {"refdir": Path(args.child_refdir), "cache": {}}
    end = args.child_end if args.child_end is not None else len(cases)
    for idx in range(args.child_start, end):
        case = cases[idx]
        rec = {k: v for k, v in case.items() if not k.startswith("_")}
        rec["idx"] = idx
        rec["load"] = round(os.getloadavg()[0], 2)
        t0 = time.time()
        fatal = False
        if args.deadline is not None and time.time() > args.deadline - 3:
            rec.update(status="skipped", reason="time budget of the table exhausted")
        else:
            try:
                rec.update(run_case(case, args, ctx))
                rec.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() \
                    or isinstance(exc, MemoryError)
                rec.update(status="oom" if oom else "error",
                           reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
                traceback.print_exc()
                fatal = _is_fatal_cuda(exc)
                if fatal:
                    rec["reason"] += " (fatal CUDA error: the rest runs in a fresh process)"
        rec["wall_s"] = round(time.time() - t0, 2)
        with open(args.child_results, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(f"[{idx}] {rec.get('group', '')} {rec.get('impl', '')}: {rec['status']} "
              f"{fmt(rec.get('time_ms'))} ms {fmt(rec.get('peak_mib'))} MiB {rec.get('reason', '')}", flush=True)
        if args.device.startswith("cuda") and not fatal:
            import gc
            gc.collect()
            torch.cuda.empty_cache()
        if fatal:
            sys.exit(3)


def _pump(proc, tail: list[str]):
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip())
        del tail[:-15]


def drive(script: str, argv: list[str], args, cases: list[dict], *, per_case_process: bool,
          budget_s: float) -> list[dict]:
    """Parent: run all cases in child processes under a budget; return the records in order."""
    t_start = time.time()
    deadline = t_start + budget_s
    refdir = Path(tempfile.mkdtemp(prefix="sf_bench_ref_"))
    results_path = refdir / "results.jsonl"
    done: dict[int, dict] = {}
    if getattr(args, "threads", None):            # children get the thread count the parent settled on
        clean, skip = [], False
        for a in argv:
            if skip:
                skip = False
            elif a == "--threads":
                skip = True
            elif not a.startswith("--threads="):
                clean.append(a)
        argv = clean + ["--threads", str(args.threads)]
    i = 0
    while i < len(cases):
        if time.time() > deadline - 3:
            for k in range(i, len(cases)):
                rec = {kk: v for kk, v in cases[k].items() if not kk.startswith("_")}
                rec.update(idx=k, status="skipped", reason="time budget of the table exhausted")
                done[k] = rec
            break
        end = i + 1 if per_case_process else len(cases)
        cmd = [sys.executable, "-u", script, *argv, "--child-start", str(i), "--child-end", str(end),
               "--child-results", str(results_path), "--child-refdir", str(refdir), "--deadline", str(deadline)]
        tail: list[str] = []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        th = threading.Thread(target=_pump, args=(proc, tail), daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=max(5.0, deadline - time.time() + 5))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            tail.append("killed: past the table's time budget")
        th.join(timeout=5)
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    done[rec["idx"]] = rec
                except Exception:  # noqa: BLE001
                    pass
        missing = [k for k in range(i, end) if k not in done]
        if missing and rc != 3:                   # the child died (or was killed) on this case
            j = missing[0]
            rec = {kk: v for kk, v in cases[j].items() if not kk.startswith("_")}
            last = " / ".join(l for l in tail[-3:] if l)
            rec.update(idx=j, status="error", reason=f"child process exited rc={rc}: {last[:300]}")
            done[j] = rec
            with open(results_path, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        nxt = [k for k in range(i, len(cases)) if k not in done]
        if not nxt:
            break
        i = nxt[0]
    import shutil
    shutil.rmtree(refdir, ignore_errors=True)     # reference tensors can be GBs
    return [done[k] for k in sorted(done)]


def status_text(rec: dict) -> str:
    if rec.get("status") == "ok":
        return "ok" + (f" ({rec['note']})" if rec.get("note") else "")
    return f"{rec.get('status')}: {rec.get('reason', '')}"
