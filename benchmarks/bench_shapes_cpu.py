"""Shapes away from the benchmark defaults, on the CPU: scale_fast (torch, cpp) against the naive loss.

The tables of this folder time each op at the shapes it was tuned for. A chunk, tile or thread
rule that is right there can collapse elsewhere (tiny batches, one modality in a few rows, a
large vocabulary over few rows, two classes over a million rows). This sweep times one fwd+bwd of
each op at such shapes beside the naive materialized version (scale_fast/bench/naive.py) and
flags every row where a scale_fast backend takes at least 1.5x its time (and over 0.5 ms more).

Time: minimum over interleaved repeats (the three implementations alternate) after one warm-up
each, default allocator (what users see). Peak: resident high-water growth of one more call in
this process (`measure.peak_extra`, gradients included). Exactness is the test suite's job; the
losses here are only timed.

    python benchmarks/bench_shapes_cpu.py                  # every shape, 2 threads
    python benchmarks/bench_shapes_cpu.py --threads 1 --reps 7
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _script import RESULTS   # scale_fast importable from a source checkout too

import scale_fast as sf
from scale_fast.bench import measure, naive, report
from scale_fast.argtypes import int_at_least

BACKENDS = ("torch", "cpp")
SLOW = 1.5  # flag: a backend at >= 1.5x naive's time (and > 0.5 ms slower)

# (op, shape): contrastive/scores (M, B, D, form, weighted, presence); lce (N, K, H, ignored share, soft)
SHAPES = [
    ("contrastive", (2, 1, 256, "ntxent", False, "full")),
    ("contrastive", (5, 7, 3, "ntxent", True, "full")),
    ("contrastive", (5, 64, 256, "ntxent", True, "full")),
    ("contrastive", (5, 64, 256, "clip", True, "full")),
    ("contrastive", (5, 64, 256, "siglip", True, "full")),
    ("contrastive", (5, 512, 256, "ntxent", True, "full")),
    ("contrastive", (5, 4096, 256, "ntxent", True, "sparse")),
    ("contrastive", (5, 2048, 1, "ntxent", False, "sparse")),
    ("contrastive", (3, 1024, 8192, "clip", False, "full")),
    ("scores", (5, 7, 3, None, False, "full")),
    ("scores", (5, 4096, 256, None, False, "sparse")),
    ("lce", (1, 151936, 16, 0.0, False)),
    ("lce", (7, 151936, 256, 0.0, False)),
    ("lce", (512, 151936, 256, 0.0, False)),
    ("lce", (1_000_000, 2, 16, 0.0, False)),
    ("lce", (8192, 1601, 768, 0.95, False)),
    ("lce", (256, 21128, 768, 0.0, True)),
]
QUICK = [("contrastive", (5, 16, 8, "ntxent", True, "sparse")), ("scores", (3, 16, 8, None, False, "full")),
         ("lce", (9, 500, 16, 0.3, False))]


def _presence(M, B, kind, g):
    """full: every modality in every row; sparse: modality 0 everywhere, the others in ~15% of the
    rows, the last in ~2%."""
    if kind == "full":
        return torch.ones(M, B, dtype=torch.bool)
    p = torch.rand(M, B, generator=g) < 0.15
    p[0] = True
    p[M - 1] = False
    p[M - 1, : max(1, B // 50)] = True
    p[1, 0] = True
    return p


def _contrastive(shape, g):
    M, B, D, form, weighted, kind = shape
    present = _presence(M, B, kind, g)
    e = torch.randn(M, B, D, generator=g).requires_grad_(True)
    w = torch.rand(B, M, M, generator=g) + 0.5 if weighted else None

    def run(impl):
        e.grad = None
        if impl == "naive":
            loss = naive.contrastive(e, present, form=form, weights=w)
        else:
            loss = sf.multi_pair_info_nce(e, present, weights=w, form=form, backend=impl).sum()
        loss.backward()
    return f"contrastive {form} M={M} B={B} D={D}{' S-weights' if weighted else ''} {kind}", run


def _scores(shape, g):
    from scale_fast._compiled_ops import run_op  # the scores op of one backend (the public call takes "auto")

    M, B, D, _, _, kind = shape
    present = _presence(M, B, kind, g)
    e = torch.randn(M, B, D, generator=g).requires_grad_(True)

    def run(impl):
        e.grad = None
        if impl == "naive":
            z = naive.normalize(e, present)
            zb = z.transpose(0, 1)
            out = (zb @ zb.transpose(1, 2)).sum() + naive.scores_sample(z, present).sum()
        else:
            S, Sp, _ = run_op(impl, "scores", e, present, "sample")
            out = S.sum() + Sp.sum()
        out.backward()
    return f"scores M={M} B={B} D={D} {kind}", run


def _lce(shape, g):
    N, K, H, ignored, soft = shape
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(K, H, generator=g) * H ** -0.5).requires_grad_(True)
    if soft:
        target = torch.softmax(torch.randn(N, K, generator=g), 1)
    else:
        target = torch.randint(0, K, (N,), generator=g)
        target[torch.rand(N, generator=g) < ignored] = -100
        target[0] = 0   # at least one kept row

    def run(impl):
        hidden.grad = weight.grad = None
        if impl == "naive":
            loss = naive.linear_ce(hidden, weight, target)
        else:
            loss = sf.linear_cross_entropy(hidden, weight, target, backend=impl)
        loss.backward()
    what = "soft targets" if soft else (f"{ignored:.0%} ignored" if ignored else "class ids")
    return f"linear CE N={N:,} K={K:,} H={H} {what}", run


def measure_shape(op, shape, reps):
    g = torch.Generator().manual_seed(0)
    label, run = {"contrastive": _contrastive, "scores": _scores, "lce": _lce}[op](shape, g)
    impls = ("naive",) + BACKENDS
    for impl in impls:
        run(impl)
    times = {impl: [] for impl in impls}
    for r in range(reps):
        for impl in impls[r % 3:] + impls[:r % 3]:
            t0 = time.perf_counter()
            run(impl)
            times[impl].append((time.perf_counter() - t0) * 1e3)
    best = {impl: min(v) for impl, v in times.items()}
    peak = {impl: measure.peak_extra(lambda impl=impl: run(impl), "cpu") for impl in impls}
    row = {"shape": label, "naive ms": best["naive"]}
    for be in BACKENDS:
        row[f"{be} ms"] = best[be]
        row[f"{be} / naive"] = best[be] / best["naive"]
    for impl in impls:
        row[f"peak MiB {impl}"] = None if peak[impl] is None else peak[impl] / 2 ** 20
    slow = [be for be in BACKENDS if best[be] >= SLOW * best["naive"] and best[be] - best["naive"] > 0.5]
    row["flag"] = f"slow: {', '.join(slow)}" if slow else ""
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch CPU threads (default 2)")
    p.add_argument("--reps", type=int_at_least(1), default=5, help="interleaved repeats per shape (default 5)")
    p.add_argument("--quick", action="store_true", help="three tiny shapes (a check of the script)")
    p.add_argument("--out", default=str(RESULTS / "shapes_cpu.md"), help="the table's path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [be for be in BACKENDS if be not in sf.available_backends(build=True)]
    if missing:
        p.error(f"backends {missing} are not available here: {sf.available_backends(with_reasons=True)}")
    info = report.machine_info("cpu")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for op, shape in QUICK if args.quick else SHAPES:
        rows.append(measure_shape(op, shape, args.reps))
        print(report.md_table(list(rows[0].keys()), rows[-1:]).splitlines()[-1], flush=True)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python benchmarks/bench_shapes_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report.header("Shapes away from the defaults, CPU: scale_fast vs the naive loss", info,
                         command.strip(), "")
    text += (f"\nload average at start: {load}.  One fwd+bwd per shape, float32, {args.threads} thread(s); time: "
             f"minimum over {args.reps} interleaved repeats; peak: resident high-water growth of one call (this "
             f"process, gradients included); flag: a backend at >= {SLOW}x naive's time. Contrastive: "
             "`sf.multi_pair_info_nce` (S-weights: random [B, M, M] row weights; sparse: modality 0 in every row, "
             "the others in ~15%, the last in ~2%) vs `naive.contrastive`; scores: S and S' (sample mode) vs "
             "naive; linear CE: `sf.linear_cross_entropy` vs F.linear + F.cross_entropy.\n\n")
    text += report.md_table(list(rows[0].keys()), rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
