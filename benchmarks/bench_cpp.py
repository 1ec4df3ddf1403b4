"""backend="cpp" (compiled CPU kernels) vs backend="torch", side by side on this machine.

Two fwd+bwd cases, float32, the same intra-op threads for both (1 by default: the machine is
shared): ``sf.scale_loss(emb[5, 4096, 256], present).total`` (ntxent, S' weights, sample mode,
modalities missing as in bench_contrastive.py) and ``sf.linear_cross_entropy`` at N=8192,
K=21128, H=768 -- the ops ``contrastive_ntxent_m5`` and ``linear_ce`` of ``scale-fast bench``
(scale_fast/bench/cpp.py), each row checked against the naive reference before it is timed;
`× base` is the time over backend="torch"'s, `CPU ms` the process time (what other jobs' load
does not inflate), `peak RSS MiB` the growth of a fresh process over one call.

    python benchmarks/bench_cpp.py                # writes benchmarks/results/cpp_cpu.md (+ .csv)
    python benchmarks/bench_cpp.py --quick        # small shapes, a smoke test (written to /tmp/sf_bench_quick)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _script import RESULTS, bench, run_table

from scale_fast.bench import cpp  # noqa: E402  (after _script: it finds the package)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test), written to /tmp/sf_bench_quick")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps-scale", type=int, default=9, help="timed repeats of the scale_loss case")
    p.add_argument("--reps-lce", type=int, default=6, help="timed repeats of the linear cross-entropy case")
    p.add_argument("--out", default=str(RESULTS / "cpp_cpu.md"), help="the markdown table (the CSV goes beside it)")
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    reps = {"contrastive_ntxent_m5": args.reps_scale, "linear_ce": args.reps_lce}
    cases = [(name, tier, sizes, reps[name]) for name, tier, sizes in cpp.cases(args.quick)]
    out = Path("/tmp/sf_bench_quick/cpp_cpu.md") if args.quick else Path(args.out)
    args.only = ",".join(cpp.IMPLS)
    return run_table("cpp", 'Compiled CPU backend (backend="cpp") vs backend="torch" — fwd+bwd, CPU', cases, args,
                     "cpu", argv=argv, default_budget_s=3600, baseline=cpp.BASELINE, out_dir=out.parent,
                     stem=out.stem, plots=False)


if __name__ == "__main__":
    sys.exit(main())
