"""Run an op's implementations over its sizes: one record (dict) per (size, implementation).

For each size: the inputs (fixed seed); the rate of torch.mm on the op's GEMM shape; then
for each implementation: its reference (float64 unless the op says otherwise) and one
fwd+bwd compared with it (a disagreeing row is marked MISMATCH and not timed), the peak
memory of one call (in this process; on CPU also in a fresh process), the timed repeats.
Anything that fails is recorded with its reason; a time budget skips (and lists) the rest.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import measure
from .op import Op


def all_ops() -> Dict[str, Op]:
    from . import contrastive, jct, linear_ce, scale_step

    ops = contrastive.ops() + linear_ce.ops() + jct.ops() + scale_step.ops()
    return {op.name: op for op in ops}


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def fresh_process_peak(op: Op, x: int, impl: str, device: str, tier: str, timeout: float = 900) -> Optional[int]:
    """Peak RSS growth of one fwd+bwd in a new process (default allocator settings): the inputs
    are built and a small warm-up call runs (library init, thread pools) before the mark is reset."""
    spec = json.dumps({"op": op.name, "x": x, "impl": impl, "device": device, "tier": tier,
                       "threads": torch.get_num_threads()})
    out = measure.fresh_process(["-m", "scale_fast.bench.runner", "--peak-child", spec], timeout=timeout)
    if "error" in out:
        raise RuntimeError(out["error"])
    return out["peak"]


def _peak_child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    op = all_ops()[spec["op"]]
    impl = next(i for i in op.impls(spec["device"]) if i.name == spec["impl"])
    warm = op.make_inputs(op.sizes["quick"][0], spec["device"], "quick")
    measure.make_step(impl.build(warm), warm)()
    del warm
    inp = op.make_inputs(spec["x"], spec["device"], spec["tier"])
    print(json.dumps({"peak": measure.peak_extra(measure.make_step(impl.build(inp), inp), spec["device"])}), flush=True)


def run_op(op: Op, device: str, tier: str, sizes: Sequence[int], *, reps: int, warmup: int,
           impl_filter: Optional[set] = None, row_budget_s: Optional[float] = None, deadline: Optional[float] = None,
           fresh_peak: bool = False, timed: bool = True, log=print) -> List[dict]:
    """Every implementation of op at every size: one record per (size, impl)."""
    records = []
    impls = op.impls(device)
    for x in sizes:
        inp = op.make_inputs(x, device, tier)
        dtype = inp[inp["leaves"][0]].dtype
        tol = measure.tolerance(dtype)
        flops = op.flops(inp)
        refs: Dict[str, tuple] = {}
        mm = None
        if timed and flops:
            try:
                mm = measure.mm_gflops(op.mm_shape(inp), dtype, device, reps=reps)
            except Exception as exc:  # noqa: BLE001
                log(f"  torch.mm rate failed: {_short(exc)}")
        for impl in impls:
            rec = {"op": op.name, "tier": tier, "x": x, "impl": impl.name, "kind": impl.kind, "status": "ok",
                   "load": round(os.getloadavg()[0], 2)}
            records.append(rec)
            if impl_filter and not any(f == impl.name or f in impl.name for f in impl_filter):
                rec.update(status="skipped", reason="not selected")
                continue
            why = impl.skip or impl.fits(inp, device)
            if why:
                rec.update(status="skipped", reason=why)
                continue
            if deadline is not None and time.time() > deadline:
                rec.update(status="skipped", reason="time budget exhausted")
                continue
            try:
                if impl.ref not in refs:
                    inp_ref = measure.cast_inputs(inp, op.ref_dtype(inp))
                    refs[impl.ref] = measure.make_step(lambda: op.reference[impl.ref](inp_ref), inp_ref)()
                    del inp_ref
                step = measure.make_step(impl.build(inp), inp)
                loss, grads = step()                     # agreement, and the first warm-up
                ref_loss, ref_grads = refs[impl.ref]
                rec["loss"] = float(loss)
                rec["loss rel err"] = measure.rel_err(loss, ref_loss)
                errs = [measure.rel_err(g, r) for g, r in zip(grads, ref_grads) if g is not None and r is not None]
                rec["grad rel err"] = max(errs) if errs else None
                del loss, grads
                bad = [k for k in ("loss rel err", "grad rel err") if rec[k] is not None and not rec[k] <= tol]
                if bad:
                    rec.update(status="MISMATCH", reason=f"{', '.join(bad)} above {tol:g}: not timed")
                    log(f"  {op.name} {op.xname}={x} {impl.name}: MISMATCH")
                    continue
                step.clear()
                t0 = time.perf_counter()
                peak = measure.peak_extra(step, device)  # a second untimed call
                first_ms = (time.perf_counter() - t0) * 1e3
                rec["peak MiB"] = None if peak is None else peak / 2 ** 20
                step.clear()
                if fresh_peak and not device.startswith("cuda"):
                    rss = fresh_process_peak(op, x, impl.name, device, tier)
                    rec["peak RSS MiB"] = None if rss is None else rss / 2 ** 20
                if timed:
                    n = reps if row_budget_s is None else int(max(1, min(reps, row_budget_s * 1e3 // max(first_ms, 1e-3))))
                    times = measure.time_ms(step, device, reps=n, warmup=warmup)
                    rec["time ms"] = statistics.median(times["wall"])
                    rec["reps"] = n
                    rec["samples ms"] = [round(t, 3) for t in times["wall"]]
                    if times["cpu"]:
                        rec["CPU ms"] = statistics.median(times["cpu"])
                    if flops:
                        rec["useful GFLOP/s"] = flops / (rec["time ms"] * 1e-3) / 1e9
                        rec["mm GFLOP/s"] = mm
                        rec["x mm"] = rec["useful GFLOP/s"] / mm if mm else None
                    if op.work:
                        unit, count = op.work(inp)
                        rec[f"{unit}/s"] = count / (rec["time ms"] * 1e-3)
                step.clear()
                del step
                log(f"  {op.name} {op.xname}={x} {impl.name}: {rec.get('time ms', float('nan')):.3f} ms, "
                    f"peak {rec['peak MiB']} MiB, loss err {rec['loss rel err']:.1e}")
            except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
                rec.update(status="failed", reason=_short(exc))
                log(f"  {op.name} {op.xname}={x} {impl.name}: failed ({rec['reason']})")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        del inp, refs
        gc.collect()
    add_ratios(op, records)
    return records


def add_ratios(op: Op, records: List[dict], baseline: Optional[str] = None):
    """"× base": time over the baseline's time at the same size (the first ok row of kind
    op.baseline, or the impl named `baseline`)."""
    for x in {r["x"] for r in records}:
        rows = [r for r in records if r["x"] == x and r["status"] == "ok" and r.get("time ms")]
        base = next((r for r in rows if (r["impl"] == baseline if baseline else r["kind"] == op.baseline)), None)
        for r in rows:
            r["x base"] = r["time ms"] / base["time ms"] if base else None


if __name__ == "__main__":  # the fresh process of fresh_process_peak
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-child":
        _peak_child(json.loads(sys.argv[2]))
