"""The largest batch `scale-fast pretrain` trains within a peak-RSS budget, with and without
`--micro-batch` (CPU), and what the cached step's second pass costs per sample.

Every probe is a fresh process running `scale-fast pretrain --steps 2` (tiny model, synthetic data,
`--threads 1` by default, evaluation on 8 held-out products) whose peak resident memory (VmHWM)
is read at its end.  The budget is the peak of the reference run (plain batch 128, default
flags) measured first in the same run, or a fixed number of MiB.  For each mode the batch doubles
from `start` while the peak stays within the budget, then bisects between the last batch that fits
and the first that does not (to a quarter of the former).  The cost of the cached step is timed in
the benchmark process, side by side on the same batch: the plain fwd+bwd, `cached_step` on the
collated batch (the extra forward pass) and `cached_step` reading each micro-batch's features again
from the dataset (what `--micro-batch` runs), wall and CPU time, median of the repeats.

    python benchmarks/bench_pretrain_memory.py            # writes benchmarks/results/pretrain_memory_cpu.md
"""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import measure, report

# the probe: the CLI as the console script runs it, then its own high-water mark
_CHILD = ("import json, sys\n"
          "from scale_fast.bench.measure import peak_rss\n"
          "from scale_fast.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          "print(json.dumps({'peak': peak_rss()}), flush=True)\n"
          "sys.exit(rc)\n")
BASE_FLAGS = ("--steps", "2", "--eval-size", "8", "--eval-every", "0", "--log-every", "1", "--no-progress")


def pretrain_flags(batch: int, micro_batch: Optional[int], prefetch: Optional[int], threads: int,
                   extra: Sequence[str] = ()) -> List[str]:
    """The `scale-fast pretrain` flags of one probe."""
    flags = ["pretrain", "--batch-size", str(batch), "--threads", str(threads), *BASE_FLAGS]
    if micro_batch:
        flags += ["--micro-batch", str(micro_batch)]
    if prefetch is not None:
        flags += ["--prefetch", str(prefetch)]
    return flags + list(extra)


def probe(flags: Sequence[str], timeout: float = 900) -> Dict[str, object]:
    """Run `scale-fast pretrain` with `flags` in a fresh process: {peak (bytes), s_per_sample (step 2),
    load (1-minute load average at the start)}; peak None if the run failed."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        out = measure.fresh_process(["-c", _CHILD, *flags, "--log", log], timeout=timeout)
        steps = []
        if os.path.exists(log):
            steps = [r for r in map(json.loads, open(log)) if r.get("event") == "train"]
    if "error" in out:
        return {"peak": None, "s_per_sample": None, "load": load, "error": out["error"]}
    last = steps[-1] if steps else None
    return {"peak": out["peak"], "load": load,
            "s_per_sample": None if not last or not last.get("samples_per_s") else 1.0 / last["samples_per_s"]}


def step_times(batch: int, micro_batch: int, *, reps: int = 3) -> Dict[str, float]:
    """Milliseconds per sample (wall and CPU, median of `reps` after one warm-up) of one training step's
    forward and backward on the tiny model and a synthetic batch: plain, cached with the batch's
    features held, cached reading each micro-batch's features from the dataset (--micro-batch)."""
    import torch
    from torch.utils.data import Subset

    from ..data import SyntheticProducts, collate, mask_batch
    from ..model import MODALITIES, SCALEConfig, SCALEModel
    from ..train.grad_cache import cached_step

    cfg = SCALEConfig.tiny()
    torch.manual_seed(0)
    model = SCALEModel(cfg)
    data = SyntheticProducts(batch, seed=0, config=cfg)
    masked, masks = mask_batch(collate(Subset(data, range(batch)), cfg), cfg, torch.Generator().manual_seed(0))
    bare, bare_masks = mask_batch(collate(Subset(data, range(batch)), cfg, features=False), cfg,
                                  torch.Generator().manual_seed(0), features="defer")
    lengths = {m: masked.valid(m).shape[1] for m in MODALITIES}

    def read(start: int, stop: int):
        return collate(Subset(data, range(start, stop)), cfg, lengths=lengths)

    def plain():
        model(masked, masks).loss.total.backward()

    steps = {"plain": plain,
             "cached": lambda: cached_step(model, masked, masks, micro_batch),
             "cached_reread": lambda: cached_step(model, bare, bare_masks, micro_batch, features=read)}
    out: Dict[str, float] = {}
    for name, fn in steps.items():
        model.zero_grad(set_to_none=True)
        t = measure.time_ms(fn, "cpu", reps=reps, warmup=1)
        for kind in ("wall", "cpu"):
            out[f"{name}_{kind}"] = sorted(t[kind])[len(t[kind]) // 2] / batch
    return out


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> Tuple[Optional[int], Optional[int]]:
    """(largest batch found to fit, smallest found not to): doubling from `start` up to `cap`, then
    bisection until the gap is at most a quarter of the batch that fits."""
    if not fits(start):
        return None, start
    lo, hi = start, None
    while hi is None and lo * 2 <= cap:
        if fits(lo * 2):
            lo *= 2
        else:
            hi = lo * 2
    while hi is not None and hi - lo > max(1, lo // 4):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def run(*, micro_batch: int = 32, threads: int = 1, start: int = 128, cap: int = 4096,
        budget_mib: Optional[float] = None, reference_batch: int = 128, extra: Sequence[str] = (),
        time_batches: Sequence[int] = (256,), reps: int = 3, log=None) -> Dict[str, object]:
    """The search for plain and --micro-batch, each with --prefetch 3 (the default) and 0, then the
    step times at `time_batches`; returns {budget, modes: [...], probes: [...], times: [...], info}."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    info = report.machine_info("cpu")
    info["torch_threads"] = threads
    t0 = time.time()
    probes: List[dict] = []

    def run_probe(batch: int, mb: Optional[int], prefetch: Optional[int]) -> dict:
        flags = pretrain_flags(batch, mb, prefetch, threads, extra)
        r = {"batch": batch, "micro_batch": mb, "prefetch": 3 if prefetch is None else prefetch, **probe(flags)}
        probes.append(r)
        peak = "failed" if r["peak"] is None else f"{r['peak'] / 2 ** 20:.0f} MiB"
        log(f"batch {batch:5d} micro {mb or '-':>4} prefetch {r['prefetch']}: peak {peak}, load {r['load']:.1f}")
        return r

    reference = run_probe(reference_batch, None, None)
    if budget_mib is not None:
        budget = int(budget_mib * 2 ** 20)
    elif reference["peak"] is None:
        raise RuntimeError(f"the reference run failed: {reference.get('error')}")
    else:
        budget = reference["peak"]
    modes = []
    for mb, prefetch in ((None, None), (None, 0), (micro_batch, None), (micro_batch, 0)):
        seen: Dict[int, dict] = {}
        if mb is None and prefetch is None and reference_batch == start:
            seen[start] = reference

        def fits(b: int) -> bool:
            if b not in seen:
                seen[b] = run_probe(b, mb, prefetch)
            return seen[b]["peak"] is not None and seen[b]["peak"] <= budget

        lo, hi = largest_batch(fits, start, cap)
        modes.append({"micro_batch": mb, "prefetch": 3 if prefetch is None else prefetch, "largest": lo,
                      "largest_peak": seen[lo]["peak"] if lo else None, "first_over": hi,
                      "first_over_peak": seen[hi]["peak"] if hi in seen else None})
    import torch

    torch.set_num_threads(threads)
    times = []
    for b in time_batches:
        log(f"step times at batch {b}, --micro-batch {micro_batch}")
        times.append({"batch": b, "load": os.getloadavg()[0], **step_times(b, micro_batch, reps=reps)})
    info["loadavg_end"] = report.loadavg()
    info["wall_s"] = round(time.time() - t0)
    return {"budget": budget, "reference_batch": reference_batch, "micro_batch": micro_batch, "threads": threads,
            "cap": cap, "modes": modes, "probes": probes, "times": times, "info": info, "extra": list(extra)}


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.0f}"


def text(result: Dict[str, object], command: str) -> str:
    """The markdown report: the largest batch per mode, the second pass's cost per sample, every probe."""
    mb, budget = result["micro_batch"], result["budget"]
    flags = " ".join(pretrain_flags(0, None, None, result["threads"], result["extra"])[3:])  # after --batch-size
    method = (f"every probe a fresh process: `scale-fast pretrain --batch-size B {flags} [--micro-batch K] "
              "[--prefetch N]` (tiny model, synthetic data), peak = its VmHWM at exit (default allocator); budget = "
              f"the peak of plain batch {result['reference_batch']} with the default --prefetch 3 (this run); "
              "batch doubled while within budget, then bisected to a quarter")
    out = [report.header("scale-fast pretrain: the largest batch within a peak-RSS budget, CPU", result["info"],
                         command, method), "",
           f"Budget: {_mib(budget)} MiB.", ""]
    plain = {m["prefetch"]: m["largest"] for m in result["modes"] if m["micro_batch"] is None}
    rows = []
    for m in result["modes"]:
        base = plain.get(m["prefetch"])
        rows.append({"mode": "plain" if m["micro_batch"] is None else f"--micro-batch {m['micro_batch']}",
                     "--prefetch": m["prefetch"], "largest batch": m["largest"] or "-",
                     "its peak MiB": _mib(m["largest_peak"]), "first over": m["first_over"] or f"none up to {result['cap']}",
                     "its peak MiB ": _mib(m["first_over_peak"]),
                     "× plain (same --prefetch)": (f"{m['largest'] / base:.1f}" if m["largest"] and base else "-"),
                     "× plain (--prefetch 3)": (f"{m['largest'] / plain[3]:.1f}" if m["largest"] and plain.get(3) else "-")})
    out += [report.md_table(list(rows[0]), rows), ""]
    # the cost of the cached step: side by side in this process, the same batch
    trows = []
    for t in result.get("times", []):
        for name, label in (("plain", "plain fwd+bwd"), ("cached", f"cached_step, K={mb}, features held"),
                            ("cached_reread", f"cached_step, K={mb}, features read again (--micro-batch)")):
            trows.append({"batch": t["batch"], "step": label, "wall ms/sample": f"{t[name + '_wall']:.2f}",
                          "CPU ms/sample": f"{t[name + '_cpu']:.2f}",
                          "CPU × plain": f"{t[name + '_cpu'] / t['plain_cpu']:.2f}", "load": f"{t['load']:.1f}"})
    if trows:
        out += ["Cost of the cached step (one training step's forward and backward on the same synthetic batch, in "
                "this process, median of the repeats; CPU time is what the load of other jobs does not inflate): the "
                "extra forward pass of pass 1, and the features read again from the dataset in both passes:", "",
                report.md_table(list(trows[0]), trows), ""]
    prows = [{"batch": p["batch"], "--micro-batch": p["micro_batch"] or "-", "--prefetch": p["prefetch"],
              "peak MiB": _mib(p["peak"]) if p["peak"] is not None else "failed",
              "within budget": "yes" if p["peak"] is not None and p["peak"] <= budget else "no",
              "ms/sample": "-" if p["s_per_sample"] is None else f"{p['s_per_sample'] * 1e3:.2f}",
              "load": f"{p['load']:.1f}"} for p in result["probes"]]
    out += ["Every probe, in order:", "", report.md_table(list(prows[0]), prows)]
    return "\n".join(out) + "\n"


def write(result: Dict[str, object], out_dir: Path, stem: str, command: str) -> Tuple[Path, Path]:
    """<out_dir>/<stem>.md and .csv (one row per probe, with the run's machine info)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(text(result, command))
    keys = ["batch", "micro_batch", "prefetch", "peak", "s_per_sample", "load", "budget"]
    info = {f"info_{k}": v for k, v in result["info"].items()}
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + list(info))
        w.writeheader()
        for p in result["probes"]:
            w.writerow({**{k: p.get(k) for k in keys}, "budget": result["budget"], **info})
    return md, cs
