"""Benchmark of the fused linear cross-entropy (fwd+bwd): scale_fast vs PyTorch and peers.

CPU table (default without CUDA): N=8192 rows, K=21128 classes, H=768, float32: the scale_fast
backends vs ``F.linear_cross_entropy`` (torch >= 2.13) in both modes (``options=None``, its
reference path, and ``LinearCrossEntropyOptions()``, its chunked path) and plain ``F.linear`` +
``F.cross_entropy``.  GPU table (``--device cuda``): N=16384, bf16, also Liger-Kernel's fused
linear cross-entropy and Cut Cross-Entropy.

The op is that of ``scale-fast bench`` (scale_fast/bench/linear_ce.py); every row is checked
against a float64 F.linear + F.cross_entropy run before it is timed.

    python benchmarks/bench_linear_ce.py                 # CPU table
    python benchmarks/bench_linear_ce.py --device cuda   # GPU table
    python benchmarks/bench_linear_ce.py --dry-run       # the GPU table's op, tiny, on CPU
"""
from __future__ import annotations

import sys

from _script import parser, run_table, table_args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, table = table_args(args)
    if args.dry_run:
        cases = [("linear_ce", "quick", [256])]
    else:
        cases = [("linear_ce", "cuda" if device.startswith("cuda") else "cpu", [16384 if table == "gpu" else 8192])]
    return run_table("linear_ce", "Fused linear cross-entropy fwd+bwd", cases, args, device, argv=argv,
                     reps=10, default_budget_s=120 if args.dry_run else (90 if device.startswith("cuda") else 360),
                     plots=False)


if __name__ == "__main__":
    sys.exit(main())
