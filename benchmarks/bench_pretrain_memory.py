"""The largest batch `scale-fast pretrain` trains within the peak RSS of plain batch 128, with and
without --micro-batch, and the cached step's cost per sample (scale_fast/bench/pretrain_memory.py).

    python benchmarks/bench_pretrain_memory.py                    # --micro-batch 32, 1 thread (~10 min)
    python benchmarks/bench_pretrain_memory.py --micro-batch 16 --budget-mib 800
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _script import RESULTS, bench  # noqa: F401  (the package import)
from scale_fast.bench import pretrain_memory


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=int, default=128, help="first batch of every search")
    p.add_argument("--cap", type=int, default=4096, help="largest batch tried")
    p.add_argument("--time-batch", type=int, nargs="*", default=[256], help="batches at which the steps are timed")
    p.add_argument("--reps", type=int, default=3, help="timed repeats per step")
    p.add_argument("--reference-batch", type=int, default=128, help="plain batch whose peak is the budget")
    p.add_argument("--budget-mib", type=float, default=None, help="a fixed budget instead of the reference's peak")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    p.add_argument("--note", default=None, help="a line of context written into the table's header")
    args, extra = p.parse_known_args(argv)  # anything else goes to `scale-fast pretrain`
    result = pretrain_memory.run(micro_batch=args.micro_batch, threads=args.threads, start=args.start, cap=args.cap,
                                 budget_mib=args.budget_mib, reference_batch=args.reference_batch, extra=extra,
                                 time_batches=args.time_batch, reps=args.reps)
    if args.note:
        result["info"]["note"] = args.note
    command = f"python benchmarks/bench_pretrain_memory.py {' '.join(argv)}".strip()
    paths = pretrain_memory.write(result, Path(args.out_dir or RESULTS), "pretrain_memory_cpu", command)
    print(pretrain_memory.text(result, command))
    print("written: " + " ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
