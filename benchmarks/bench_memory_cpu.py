"""Resident memory (what users see) and allocated memory of one SCALE contrastive fwd+bwd, CPU.

``sf.scale_loss(e[5, B, 256], present).total.backward()``, float32, every modality present
(``--rates``: the present rates of bench_contrastive.py), backends torch and cpp, 1 and 2
threads.  Each measurement runs in a fresh process after a small warm-up call:

- peak RSS growth: VmHWM minus VmRSS just before the call (VmHWM reset through
  /proc/self/clear_refs), allocator untuned -- what `top` or a container limit sees;
- peak allocated: the same in a second fresh process with glibc's mmap threshold pinned
  (every buffer above 256 KiB mapped and unmapped on its own, so the mark follows the
  live allocations);

both include the embedding gradient (listed).  ``--timing B``: naive / torch / cpp fwd+bwd
interleaved in one process (median of the repeats) for the time ratios to naive.

    python benchmarks/bench_memory_cpu.py                         # B 4096 16384, threads 1 2
    python benchmarks/bench_memory_cpu.py --sizes 16384 --threads 2 --timing 4096
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _script import RESULTS, run_child
from scale_fast.bench import contrastive, measure, naive, report

PRESENT_RATES = contrastive.PRESENT_RATES
M, D = 5, 256


def _inputs(B: int, rates: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    if rates:
        present = torch.rand(M, B, generator=g) < torch.tensor(PRESENT_RATES)[:, None]
        present[0] |= ~present.any(0)
    else:
        present = torch.ones(M, B, dtype=torch.bool)
    return torch.randn(M, B, D, generator=g, requires_grad=True), present


def _step(backend: str):
    import scale_fast as sf

    def step(e, present):
        sf.scale_loss(e, present, backend=backend).total.backward()
        e.grad = None
    return step


def child(kind: str, backend: str, B: int, threads: int, rates: bool) -> None:
    import torch

    if kind == "alloc":
        measure.pin_malloc()
    torch.set_num_threads(threads)
    e, present = _inputs(B, rates)
    step = _step(backend)
    step(*_inputs(64, rates))                       # warm-up: code pages, thread pool, cpp build
    t0 = time.perf_counter()
    peak = measure.peak_extra(lambda: step(e, present), "cpu")
    rec = {"ms": (time.perf_counter() - t0) * 1e3, "mib": None if peak is None else peak / 2 ** 20}
    print(json.dumps(rec), flush=True)


def timing_child(B: int, reps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    e, present = _inputs(B, True)
    impls = {
        "naive": lambda: naive.contrastive(
            e, present, form="ntxent",
            weights=naive.scores_sample(naive.normalize(e, present), present)).backward(),
        "torch": lambda: _step("torch")(e, present),
        "cpp": lambda: _step("cpp")(e, present),
    }
    times = {name: [] for name in impls}
    for fn in impls.values():                       # warm-up
        fn()
        e.grad = None
    for _ in range(reps):                           # interleaved, so load drifts hit all alike
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            e.grad = None
    print(json.dumps({"B": B, "threads": threads, "times": times}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backends", nargs="+", default=["torch", "cpp"])
    p.add_argument("--rates", action="store_true", help=f"present rates {PRESENT_RATES} instead of all present")
    p.add_argument("--no-alloc", action="store_true", help="skip the peak-allocated processes")
    p.add_argument("--timing", type=int, default=None, metavar="B", help="also time naive/torch/cpp at this B")
    p.add_argument("--timing-threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=None, help="where the .md/.csv go (default benchmarks/results)")
    args = p.parse_args()
    tag = "rates" if args.rates else "all"

    info = report.machine_info("cpu")
    t_start = time.time()
    rows = []
    for B in args.sizes:
        for threads in args.threads:
            for backend in args.backends:
                load = os.getloadavg()[0]
                rss = run_child(__file__, ["--child", "rss", backend, B, threads, tag])
                rec = {"B": B, "backend": backend, "threads": threads, "load": load,
                       "peak RSS growth MiB": rss.get("mib"), "time ms": rss.get("ms"),
                       "of which embedding gradient MiB": M * B * D * 4 / 2 ** 20}
                if not args.no_alloc:
                    alloc = run_child(__file__, ["--child", "alloc", backend, B, threads, tag])
                    rec["peak allocated MiB"] = alloc.get("mib")
                if "error" in rss:
                    rec["error"] = rss["error"]
                rows.append(rec)
                print(rec, flush=True)
    timing = None
    if args.timing:
        timing = run_child(__file__, ["--timing-child", args.timing, args.reps, args.timing_threads])
        print(timing, flush=True)
    info["loadavg_end"] = report.loadavg()
    info["wall_s"] = round(time.time() - t_start)

    present = f"present rates {PRESENT_RATES}" if args.rates else "every modality present"
    text = report.header(
        "SCALE contrastive fwd+bwd: resident and allocated memory, CPU", info,
        "python benchmarks/bench_memory_cpu.py " + " ".join(sys.argv[1:]),
        "one fwd+bwd in a fresh process after a small warm-up call; peak RSS growth = VmHWM minus VmRSS before the "
        "call with the allocator untuned (what users see); peak allocated = the same in another fresh process with "
        "glibc's mmap threshold pinned at 256 KiB (it follows the live allocations); both include the embedding "
        "gradient; time = that one call (one sample)")
    text += f"\n`sf.scale_loss(embeddings[{M}, B, {D}], present).total.backward()`, float32, {present}.\n\n"
    cols = ["B", "backend", "threads", "peak RSS growth MiB", "peak allocated MiB", "of which embedding gradient MiB",
            "time ms", "load"]
    text += report.md_table(cols, rows)
    errors = [f"- {r['backend']} B={r['B']} threads={r['threads']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        text += "\nErrors:\n\n" + "\n".join(errors) + "\n"
    if timing and "times" in timing:
        med = {k: statistics.median(v) for k, v in timing["times"].items()}
        text += (f"\n## Time, B={timing['B']} ({PRESENT_RATES} present), "
                 f"{report.plural(timing['threads'], 'thread')}, naive / torch / cpp interleaved in one "
                 f"process, median of {args.reps}\n\n")
        text += report.md_table(["impl", "time ms", "ratio to naive", "samples ms"], [
            {"impl": k, "time ms": v, "ratio to naive": v / med["naive"],
             "samples ms": ", ".join(f"{x:.0f}" for x in timing["times"][k])} for k, v in med.items()])
    elif timing:
        text += f"\nTiming failed: {timing.get('error')}\n"
    print(text)
    out = Path(args.out_dir) if args.out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "contrastive_memory_cpu.md").write_text(text)
    with open(out / "contrastive_memory_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"] + [f"info_{k}" for k in info])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in cols + ["error"]}, **{f"info_{k}": v for k, v in info.items()}})
    print(f"written: {out}/contrastive_memory_cpu.md .csv")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "rates")
    elif len(sys.argv) == 5 and sys.argv[1] == "--timing-child":
        timing_child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
