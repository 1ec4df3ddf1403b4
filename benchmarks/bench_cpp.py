"""backend="cpp" (compiled CPU kernels) vs backend="torch", side by side on this machine.

Two fwd+bwd cases, float32, 1 intra-op thread for both sides (the machine is shared):

- ``scale``: ``sf.scale_loss(embeddings, present).total`` (contrastive part: ntxent, S'
  weights, sample mode, no masked tasks) at B=4096, M=5, D=256, present rates
  [1.0, 0.95, 0.8, 0.3, 0.2] with the inputs of bench_contrastive.py (seed 1234 + B);
  gradient of the embeddings.
- ``lce``: ``sf.linear_cross_entropy(hidden, weight, target)`` at N=8192, K=21128, H=768
  (class ids, no ignored rows, reduction mean); gradients of hidden and weight.

Time: both backends in ONE process, after one warm-up call each, repeats interleaved
(torch, cpp, cpp, torch, ...) so that a change of the machine's load hits both alike; the
median wall time (perf_counter) is the headline, the median CPU time of the process
(process_time: what the load of other jobs does not inflate) is shown next to it.
Peak extra memory: one fresh process per (case, backend): the inputs are built, a small
warm-up call runs (library init, the cpp extension load), VmHWM is reset through
/proc/self/clear_refs ("5"), one full fwd+bwd runs, and VmHWM - VmRSS(before) is the peak
(it includes the gradients).  Agreement: relative difference of loss and gradients between
the two backends.  GEMM GFLOP/s: the FLOPs of the GEMMs both backends do (scale: 4 (2n)^2 D
per pair -- half Gram forward, half Gram + two half products backward; lce: 6 N K H) over
the median wall time; torch.mm rate: MKL on the tile / block shapes, same process.

    python benchmarks/bench_cpp.py                # ~7-10 min on 2 cores
    python benchmarks/bench_cpp.py --quick        # tiny shapes, a smoke test (not written)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

RATES = [1.0, 0.95, 0.8, 0.3, 0.2]
BACKENDS = ("torch", "cpp")
TITLE = "Compiled CPU backend (backend=\"cpp\") vs backend=\"torch\" — fwd+bwd, CPU"


def shapes(op: str, quick: bool) -> dict:
    if op == "scale":
        return dict(B=256, M=5, D=32) if quick else dict(B=4096, M=5, D=256)
    return dict(N=64, K=500, H=32) if quick else dict(N=8192, K=21128, H=768)


# ------------------------------------------------------------------ inputs and steps
def make_case(op: str, quick: bool, small: bool = False):
    """(step(backend) -> (loss, grads), gemm_flops) for the case (or a tiny version of it: warm-up)."""
    sf = common.import_scale_fast()
    if op == "scale":
        s = dict(B=16, M=5, D=8) if small else shapes(op, quick)
        B, M, D = s["B"], s["M"], s["D"]
        g = torch.Generator().manual_seed(1234 + B)          # as bench_contrastive.make_inputs
        emb = torch.randn(M, B, D, generator=g)
        present = torch.rand(M, B, generator=g) < torch.tensor(RATES)[:, None]
        present[0] |= ~present.any(0)
        emb.requires_grad_(True)
        flops = 0
        for i in range(M):
            for j in range(i + 1, M):
                n = int((present[i] & present[j]).sum())
                flops += 4 * (2 * n) ** 2 * D

        def step(backend):
            emb.grad = None
            loss = sf.scale_loss(emb, present, backend=backend).total
            loss.backward()
            return loss.detach(), [emb.grad]
        return step, flops

    s = dict(N=8, K=50, H=8) if small else shapes(op, quick)
    N, K, H = s["N"], s["K"], s["H"]
    g = torch.Generator().manual_seed(4321)
    hidden = (torch.randn(N, H, generator=g) * 0.5).requires_grad_(True)
    weight = (torch.randn(K, H, generator=g) / H ** 0.5).requires_grad_(True)
    target = torch.randint(0, K, (N,), generator=g)

    def step(backend):
        hidden.grad = weight.grad = None
        loss = sf.linear_cross_entropy(hidden, weight, target, backend=backend)
        loss.backward()
        return loss.detach(), [hidden.grad, weight.grad]
    return step, 6 * N * K * H


# ------------------------------------------------------------------ children
def child_memory(op: str, backend: str, quick: bool) -> dict:
    warm, _ = make_case(op, quick, small=True)
    step, _ = make_case(op, quick)
    warm(backend)                                           # init, extension load
    if not common.cpu_peak_supported():
        return {"peak_bytes": None, "note": "no VmHWM reset"}
    peak, (loss, _), ms = common.peak_extra_cpu(lambda: step(backend))
    return {"peak_bytes": peak, "first_ms": ms, "loss": float(loss)}


def child_time(op: str, quick: bool, reps: int) -> dict:
    step, flops = make_case(op, quick)
    results = {}
    for be in BACKENDS:                                     # warm-up, and the agreement check
        loss, grads = step(be)
        results[be] = (loss.double(), [g.detach().double().clone() for g in grads])
    loss_t, grads_t = results["torch"]
    loss_c, grads_c = results["cpp"]
    agree = {"loss_rel": abs(float(loss_c - loss_t)) / max(abs(float(loss_t)), 1e-30),
             "grad_rel": max(common.rel_err(a, b) for a, b in zip(grads_c, grads_t))}
    del results, grads_t, grads_c
    wall = {be: [] for be in BACKENDS}
    cpu = {be: [] for be in BACKENDS}
    loads = []
    for k in range(reps):
        order = BACKENDS if k % 2 == 0 else BACKENDS[::-1]
        for be in order:
            loads.append(os.getloadavg()[0])
            t0, c0 = time.perf_counter(), time.process_time()
            step(be)
            wall[be].append((time.perf_counter() - t0) * 1e3)
            cpu[be].append((time.process_time() - c0) * 1e3)
    return {"wall_ms": wall, "cpu_ms": cpu, "flops": flops, "agree": agree, "load": statistics.mean(loads)}


def child_mm(quick: bool) -> dict:
    """torch.mm rate (GFLOP/s) on the cpp kernels' GEMM shapes."""
    out = {}
    t = 64 if quick else 256
    d = 32 if quick else 256
    r = common.mm_rate(t, d, t, dtype=torch.float32, device="cpu", budget_s=2.0)
    out["scale"] = (r["shape"], r["gflops"])
    n, k, h = (32, 500, 32) if quick else (397, 21128, 768)
    r = common.mm_rate(n, h, k, dtype=torch.float32, device="cpu", budget_s=4.0)
    out["lce"] = (r["shape"], r["gflops"])
    return out


def run_child(args_list: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-u", os.path.abspath(__file__), *args_list]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {args_list} failed (rc={proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------ parent
def describe(op: str, quick: bool) -> str:
    s = shapes(op, quick)
    if op == "scale":
        return f"scale_loss B={s['B']} M={s['M']} D={s['D']}"
    return f"linear_cross_entropy N={s['N']} K={s['K']} H={s['H']}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test); the table is not written")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps-scale", type=int, default=9)
    p.add_argument("--reps-lce", type=int, default=6)
    p.add_argument("--out", default=str(common.RESULTS_DIR / "cpp_cpu.md"))
    p.add_argument("--note", default=None)
    p.add_argument("--child", choices=["mem", "time", "mm"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--op", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.child:
        sf = common.import_scale_fast()
        if "cpp" not in sf.available_backends():
            raise SystemExit("backend 'cpp' is not available: " + sf.cpp_backend.unavailable_reason())
        if args.child == "mem":
            res = child_memory(args.op, args.backend, args.quick)
        elif args.child == "time":
            res = child_time(args.op, args.quick, args.reps)
        else:
            res = child_mm(args.quick)
        print("RESULT " + json.dumps(res), flush=True)
        return

    sf = common.import_scale_fast()
    t_build = time.perf_counter()
    if "cpp" not in sf.available_backends():           # builds (or loads the cached build) here, once
        raise SystemExit("backend 'cpp' is not available: " + sf.cpp_backend.unavailable_reason())
    t_build = time.perf_counter() - t_build
    info = common.machine_info("cpu")
    info["torch_threads"] = args.threads
    ext = sf.cpp_backend.extension()
    info["note"] = (args.note or "") + (" " if args.note else "") + (
        f"cpp extension: {'AVX2+FMA' if ext.has_avx2() else 'generic'} kernels, tile GEMMs through "
        f"{'the BLAS sgemm_ torch exports (MKL)' if ext.direct_blas_available() else 'at::mm'}; "
        f"build/load in this run {t_build:.1f} s")
    common_flags = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])

    rows = []
    mm = run_child(["--child", "mm", *common_flags], 300)
    for op, reps in (("scale", args.reps_scale), ("lce", args.reps_lce)):
        mem = {}
        for be in BACKENDS:
            mem[be] = run_child(["--child", "mem", "--op", op, "--backend", be, *common_flags], 1200)
            print(f"{op} {be}: peak extra {mem[be]['peak_bytes'] / 2**20:.1f} MiB", flush=True)
        tm = run_child(["--child", "time", "--op", op, "--reps", str(reps), *common_flags], 3000)
        med = {be: statistics.median(tm["wall_ms"][be]) for be in BACKENDS}
        cmed = {be: statistics.median(tm["cpu_ms"][be]) for be in BACKENDS}
        for be in BACKENDS:
            rows.append({
                "case": describe(op, args.quick), "backend": be,
                "time ms": med[be], "CPU ms": cmed[be], "reps": len(tm["wall_ms"][be]),
                "speedup": med["torch"] / med[be], "CPU speedup": cmed["torch"] / cmed[be],
                "peak extra MiB": mem[be]["peak_bytes"] / 2 ** 20 if mem[be]["peak_bytes"] is not None else None,
                "GEMM GFLOP/s": tm["flops"] / (med[be] * 1e-3) / 1e9,
                "vs torch: loss rel diff": tm["agree"]["loss_rel"] if be == "cpp" else None,
                "grad rel diff": tm["agree"]["grad_rel"] if be == "cpp" else None,
                "load": tm["load"],
                "_wall": tm["wall_ms"][be], "_cpu": tm["cpu_ms"][be], "_op": op,
            })
            print(f"{op} {be}: {med[be]:.0f} ms wall, {cmed[be]:.0f} ms CPU, "
                  f"samples {[round(x) for x in tm['wall_ms'][be]]}", flush=True)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    cols = ["case", "backend", "time ms", "CPU ms", "reps", "speedup", "CPU speedup", "peak extra MiB",
            "GEMM GFLOP/s", "vs torch: loss rel diff", "grad rel diff", "load"]
    command = "python benchmarks/bench_cpp.py" + (f" --threads {args.threads}" if args.threads != 1 else "")
    text = common.header_markdown(TITLE, info, command)
    text += (
        "\nCases (float32, fwd+bwd, `torch.set_num_threads(%d)` for both backends): `scale_loss` = "
        "`sf.scale_loss(emb[5, 4096, 256], present).total` (ntxent, S' weights, sample mode, no masked tasks; "
        "present rates %s, seed fixed as in bench_contrastive.py), gradient of emb; `linear_cross_entropy` = "
        "`sf.linear_cross_entropy(hidden[8192, 768], weight[21128, 768], target)` (class ids, mean), gradients of "
        "hidden and weight.\n\n"
        "time ms: median wall time of the repeats (after one warm-up call each, both backends interleaved in one "
        "process); CPU ms: median CPU time of the process over the same calls (what the other jobs' load does not "
        "inflate); speedup = torch / cpp. peak extra: VmHWM - VmRSS of one fwd+bwd in a fresh process after a "
        "small warm-up call (includes the gradients). GEMM GFLOP/s: the GEMM FLOPs both backends do "
        "(scale: 4 (2n)^2 D per pair, lce: 6 N K H) per wall second; torch.mm in the same run: %s.\n\n"
        % (args.threads, RATES, "; ".join(f"{s} {r:.1f} GFLOP/s" for s, r in mm.values())))
    text += common.md_table(cols, rows)
    text += "\nRaw samples (wall ms / CPU ms):\n\n"
    for r in rows:
        text += (f"- {r['case']} {r['backend']}: wall {[round(x) for x in r['_wall']]}, "
                 f"CPU {[round(x) for x in r['_cpu']]}\n")
    text += "\n## Targets (from the issue): cpp >= 1.3x faster than torch, no more memory\n\n"
    wins = {}
    for op in ("scale", "lce"):
        t, c = [r for r in rows if r["_op"] == op]
        sp, csp = t["time ms"] / c["time ms"], t["CPU ms"] / c["CPU ms"]
        mem_ok = c["peak extra MiB"] is not None and t["peak extra MiB"] is not None and \
            c["peak extra MiB"] <= t["peak extra MiB"]
        wins[op] = sp > 1.0 and mem_ok
        text += (f"- {t['case']}: wall {t['time ms']:.0f} / {c['time ms']:.0f} ms = **{sp:.2f}x** "
                 f"(CPU time {csp:.2f}x), peak extra {fmt_mib(c['peak extra MiB'])} vs "
                 f"{fmt_mib(t['peak extra MiB'])} MiB: {'PASS' if sp >= 1.3 and mem_ok else 'FAIL'}"
                 f"{'' if sp >= 1.3 or not wins[op] else ' (below the 1.3x target, but faster with less memory)'}\n")
    text += ("\n`auto` on CPU (scale_fast/backends/cpp/__init__.py): cpp wins on "
             + (", ".join(op for op in wins if wins[op]) or "no op") + " in this run; "
             + ("`preferred_on_cpu = True` (both ops exposed) is supported by it.\n" if all(wins.values()) else
                "expose only the winning ops there.\n"))
    if args.quick:
        print(text)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written {out}")


def fmt_mib(v):
    return "–" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
