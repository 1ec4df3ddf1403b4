"""JCT throughput: absent modalities removed ("drop") against masking ("mask") and the paper's zero
imputation ("zero"), fwd+bwd on one batch of synthetic products.

The op is that of ``scale-fast bench --ops jct`` (scale_fast/bench/jct.py): tokens/s = B x T /
time, T the concatenated padded length of the batch (the tokens "zero" processes), so the
`× base` column (time over "mask"'s) is the speedup on the same batch.

    python benchmarks/bench_jct.py                       # writes benchmarks/results/jct_cpu.md (+ .csv)
    python benchmarks/bench_jct.py --sizes base --device cuda
"""
from __future__ import annotations

import argparse
import sys

from _script import bench, run_table

from scale_fast.bench.jct import DIMS  # noqa: E402  (after _script: it finds the package)

SIZES = {"tiny": "quick", "small": "cpu", "base": "cuda"}   # (dim, layers, heads): scale_fast/bench/jct.py DIMS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sizes", default="tiny,small",
                   help="comma-separated JCT sizes among " + ", ".join(f"{k} {DIMS[v]}" for k, v in SIZES.items()))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    device = bench.command.resolve_device(args.device)
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose among {', '.join(SIZES)}")
    cases = [("jct", SIZES[s], [args.batch_size]) for s in args.sizes.split(",")]
    return run_table("jct", "JCT fwd+bwd throughput: drop vs mask vs zero imputation", cases, args, device, argv=argv,
                     reps=args.reps, default_budget_s=1800, out_dir=args.out, plots=False)


if __name__ == "__main__":
    sys.exit(main())
