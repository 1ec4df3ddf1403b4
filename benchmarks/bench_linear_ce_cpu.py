"""Linear cross-entropy on the CPU, side by side: scale_fast torch and cpp vs torch's own chunked op.

N=8192 rows, K=21128 classes, H=768, float32, class-id targets, reduction mean, gradients of
hidden and weight.  Peers: ``F.linear_cross_entropy(options=torch.nn.LinearCrossEntropyOptions())``
(torch >= 2.13, its chunked path).  For each thread count:

* time: ONE process runs the implementations interleaved (round r runs every implementation
  once, the order rotating each round), after a small warm-up call each; wall and CPU time
  of one fwd+bwd, medians over the rounds;
* the GEMM floor: the three GEMMs alone (logits, d hidden, d weight) in scale_fast's chunks,
  timed in the same rounds; and the machine's rate: the same 6NKH FLOPs as square 2048^3 GEMMs;
* peak resident memory growth (what ``top`` and container limits see): a fresh process per
  implementation, VmHWM minus VmRSS just before one fwd+bwd (after a small warm-up call);
* peak allocation: the same with MALLOC_MMAP_THRESHOLD_=65536, so that every buffer above
  64 KiB is mapped and unmapped on its own and the high-water mark follows live allocations.

    python benchmarks/bench_linear_ce_cpu.py                      # threads 1 and 2, 3 rounds
    python benchmarks/bench_linear_ce_cpu.py --threads 1 --rounds 2 --n 2048
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))

IMPLS = ("scale_fast torch", "scale_fast cpp", "F.linear_cross_entropy (chunked options)")
PEER = IMPLS[2]
# The GEMM floor: an exact float32 linear CE needs three N x K x H GEMMs (logits, d hidden, d weight);
# timed alone, in scale_fast's chunks and buffers, beside the others (no loss: time rows only).
FLOOR = "the three GEMMs alone (scale_fast's chunks)"
# The machine's rate: the same 6 N K H FLOPs as square GEMMs (torch.mm, SQUARE^3), the best float32
# rate torch's BLAS reaches here; time scaled to exactly 6 N K H FLOPs.
RATE = "the same FLOPs as square GEMMs (this CPU's float32 rate)"
SQUARE = 2048


def _inputs(n, k, h, seed=4321):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(k, h, generator=g) * h ** -0.5).requires_grad_(True)
    target = torch.randint(0, k, (n,), generator=g)
    return hidden, weight, target


def _step(impl, hidden, weight, target):
    """One fwd+bwd; returns (loss, d hidden, d weight)."""
    import torch
    import torch.nn.functional as F

    import scale_fast as sf

    hidden.grad = weight.grad = None
    if impl == PEER:
        loss = F.linear_cross_entropy(hidden, weight, target, options=torch.nn.LinearCrossEntropyOptions())
    else:
        loss = sf.linear_cross_entropy(hidden, weight, target, backend=impl.split()[-1])
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _gemms(hidden, weight):
    """The three GEMMs of the chunk loop (scale_fast/backends/_lce_driver.py), nothing else."""
    import torch

    from scale_fast.backends._lce_driver import host_engine

    (n, h), k = hidden.shape, weight.shape[0]
    step = host_engine(None).rows_per_chunk(n, k, h, hidden.device)
    with torch.no_grad():
        x = hidden.new_empty(step, k)
        dh, dw = torch.empty_like(hidden), torch.empty_like(weight)
        for r0 in range(0, n, step):
            rows = hidden[r0:r0 + step]
            g = torch.mm(rows, weight.T, out=x[:rows.shape[0]])
            torch.mm(g, weight, out=dh[r0:r0 + step])
            if r0 == 0:  # as the chunk loop: the first chunk writes d weight
                torch.mm(g.T, rows, out=dw)
            else:
                dw.addmm_(g.T, rows)


def _square_gemms(n, k, h, a, b, c):
    """6 n k h FLOPs as SQUARE^3 GEMMs c = a @ b (operands made before the clock starts); returns
    the factor that scales the time to exactly 6 n k h."""
    import torch

    reps = max(1, round(6 * n * k * h / (2 * SQUARE ** 3)))
    for _ in range(reps):
        torch.mm(a, b, out=c)
    return 6 * n * k * h / (reps * 2 * SQUARE ** 3)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def child_time(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    hidden, weight, target = _inputs(args.n, args.k, args.h)
    small = _inputs(64, 1000, args.h, seed=1)
    for impl in IMPLS:
        _step(impl, *small)
    _gemms(*small[:2])
    square = (torch.randn(SQUARE, SQUARE), torch.randn(SQUARE, SQUARE), torch.empty(SQUARE, SQUARE))
    _square_gemms(1, 1, 1, *square)
    timed = IMPLS + (FLOOR, RATE)
    times = {impl: [] for impl in timed}
    cpu = {impl: [] for impl in timed}
    loads = []
    results = {}
    for r in range(args.rounds):
        order = timed[r % len(timed):] + timed[:r % len(timed)]
        loads.append(os.getloadavg()[0])
        for impl in order:
            t0, c0 = time.perf_counter(), time.process_time()
            scale = 1.0
            if impl == RATE:
                scale = _square_gemms(args.n, args.k, args.h, *square)
            elif impl == FLOOR:
                _gemms(hidden, weight)
            else:
                out = _step(impl, hidden, weight, target)
            times[impl].append((time.perf_counter() - t0) * 1e3 * scale)
            cpu[impl].append((time.process_time() - c0) * 1e3 * scale)
            if r == 0 and impl in IMPLS:
                results[impl] = [t.clone() for t in out]
    ref = results[PEER]
    errs = {impl: (_rel(results[impl][0], ref[0]), max(_rel(results[impl][1], ref[1]), _rel(results[impl][2], ref[2])))
            for impl in IMPLS}
    return {"times": times, "cpu": cpu, "loads": loads, "errs": errs}


def child_memory(args) -> dict:
    import torch

    from scale_fast.bench import measure

    torch.set_num_threads(args.threads)
    small = _inputs(64, 1000, args.h, seed=1)
    _step(args.impl, *small)
    hidden, weight, target = _inputs(args.n, args.k, args.h)
    start = time.perf_counter()
    extra = measure.peak_extra(lambda: _step(args.impl, hidden, weight, target), "cpu")
    return {"extra_mib": extra / 2 ** 20, "ms": 1e3 * (time.perf_counter() - start)}


def _run_child(argv, env=None) -> dict:
    from scale_fast.bench import measure

    out = measure.fresh_process([os.path.abspath(__file__), *argv], env=env)
    if "error" in out:
        raise RuntimeError(f"child {argv}: {out['error']}")
    return out


def _write(args, info, load_start, rows):
    from scale_fast.bench import report

    info = dict(info, loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    command = "python benchmarks/bench_linear_ce_cpu.py " + " ".join(sys.argv[1:])
    text = report.header("Linear cross-entropy fwd+bwd on the CPU, side by side", info, command.strip(), "")
    text += (f"\nload average at start: {load_start}.  N={args.n}, K={args.k}, H={args.h}, float32, class-id "
             "targets, reduction mean, gradients of hidden and weight.  Peer: "
             "`F.linear_cross_entropy(options=torch.nn.LinearCrossEntropyOptions())` (torch's chunked path). "
             "Time: medians over rounds in one process, implementations interleaved (order rotating); CPU ms is "
             "the process CPU time, which other jobs' load inflates less than wall time. Peak RSS growth: VmHWM - "
             "VmRSS of one fwd+bwd in a fresh process; peak alloc: the same with MALLOC_MMAP_THRESHOLD_=65536 "
             "(every buffer over 64 KiB mapped on its own: the high-water mark of live allocations). Both include "
             f"the gradients of hidden ({args.n * args.h * 4 / 2 ** 20:.0f} MiB) and weight "
             f"({args.k * args.h * 4 / 2 ** 20:.0f} MiB). Rel diffs vs the peer. The second-to-last row of each thread "
             "count times only the three GEMMs an exact linear CE needs (logits, d hidden, d weight) in the same "
             "chunks: the floor of every implementation above. The row after it: the same 6NKH FLOPs as square "
             f"{SQUARE}x{SQUARE} GEMMs (torch.mm), the best float32 rate torch's BLAS reaches on this CPU: an exact "
             "float32 implementation on that BLAS cannot go below it.\n\n")
    text += report.md_table(list(rows[0].keys()), rows)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"written: {args.out}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=21128)
    p.add_argument("--h", type=int, default=768)
    p.add_argument("--child", choices=["time", "memory"])
    p.add_argument("--impl")
    p.add_argument("--out", default=os.path.join(HERE, "results", "linear_ce_cpu_side_by_side.md"))
    args = p.parse_args()
    if args.child:
        args.threads = int(args.threads)
        print(json.dumps(child_time(args) if args.child == "time" else child_memory(args)), flush=True)
        return 0

    from scale_fast.bench import report

    info = report.machine_info("cpu")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    shape = ["--n", str(args.n), "--k", str(args.k), "--h", str(args.h)]
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        base = [*shape, "--threads", str(threads)]
        print(f"threads {threads}: timing {args.rounds} interleaved rounds", flush=True)
        tm = _run_child(["--child", "time", "--rounds", str(args.rounds), *base])
        mem = {}
        for impl in IMPLS:
            print(f"threads {threads}: memory of {impl}", flush=True)
            rss = _run_child(["--child", "memory", "--impl", impl, *base])["extra_mib"]
            live = _run_child(["--child", "memory", "--impl", impl, *base],
                              env={"MALLOC_MMAP_THRESHOLD_": "65536"})["extra_mib"]
            mem[impl] = (rss, live)
        peer_t = statistics.median(tm["times"][PEER])
        peer_c = statistics.median(tm["cpu"][PEER])
        for impl in IMPLS:
            t, c = statistics.median(tm["times"][impl]), statistics.median(tm["cpu"][impl])
            rows.append({"threads": threads, "impl": impl, "time ms": t, "CPU ms": c,
                         "time / peer": t / peer_t, "CPU time / peer": c / peer_c,
                         "peak RSS growth MiB": mem[impl][0], "RSS / peer": mem[impl][0] / mem[PEER][0],
                         "peak alloc MiB": mem[impl][1], "loss rel diff": tm["errs"][impl][0],
                         "grad rel diff": tm["errs"][impl][1],
                         "wall ms per round": " / ".join(f"{x:,.0f}" for x in tm["times"][impl]),
                         "load (1 min) per round": " / ".join(f"{x:.1f}" for x in tm["loads"])})
        for impl in (FLOOR, RATE):
            t, c = statistics.median(tm["times"][impl]), statistics.median(tm["cpu"][impl])
            rows.append({"threads": threads, "impl": impl, "time ms": t, "CPU ms": c, "time / peer": t / peer_t,
                         "CPU time / peer": c / peer_c,
                         "wall ms per round": " / ".join(f"{x:,.0f}" for x in tm["times"][impl]),
                         "load (1 min) per round": " / ".join(f"{x:.1f}" for x in tm["loads"])})
        print(report.md_table(list(rows[0].keys()), rows[-5:]), flush=True)
        _write(args, info, load_start, rows)  # after every thread count: a partial run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
