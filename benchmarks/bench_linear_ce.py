"""Benchmark of the fused linear cross-entropy (fwd+bwd): scale_fast vs PyTorch and peers.

CPU table (default without CUDA): N=8192 rows, K=21128 classes, H=768, float32: the scale_fast
backends vs ``F.linear_cross_entropy`` (torch >= 2.13) in both modes (``options=None``, its
reference path, and ``LinearCrossEntropyOptions()``, its chunked path) and plain ``F.linear`` +
``F.cross_entropy``.  GPU table (``--device cuda``): N=16384, bf16, also Liger-Kernel's fused
linear cross-entropy and Cut Cross-Entropy.

``--rows`` / ``--vocab`` / ``--hidden`` set N, K and H (a modern LLM vocabulary:
``--rows 65536 --vocab 151936``); such a table is written to linear_ce_k<K>[_h<H>]_n<N>_<device>.

The op is that of ``scale-fast bench`` (scale_fast/bench/linear_ce.py); every row is checked
against a float64 F.linear + F.cross_entropy run in row chunks (checkpointed, so any N x K fits)
before it is timed.

    python benchmarks/bench_linear_ce.py                 # CPU table
    python benchmarks/bench_linear_ce.py --device cuda   # GPU table
    python benchmarks/bench_linear_ce.py --device cuda --rows 65536 --vocab 151936
    python benchmarks/bench_linear_ce.py --dry-run       # the GPU table's op, tiny, on CPU (K from --vocab)
"""
from __future__ import annotations

import sys

from _script import parser, run_table, table_args

from scale_fast.bench.linear_ce import linear_ce_op
from scale_fast.argtypes import int_at_least


def _row_counts(text: str):
    """--rows: comma-separated ints >= 1."""
    return [int_at_least(1)(v) for v in text.split(",")]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=_row_counts, default=None,
                   help="comma-separated row counts N (default: 16384 on CUDA, 8192 on CPU; 256 with --dry-run)")
    p.add_argument("--vocab", type=int_at_least(1), default=None,
                   help="classes K (default: 21128; 4096 with --dry-run)")
    p.add_argument("--hidden", type=int_at_least(1), default=None,
                   help="hidden width H (default: 768; 128 with --dry-run)")
    args = p.parse_args(argv)
    device, table = table_args(args)
    tier = "quick" if args.dry_run else ("cuda" if device.startswith("cuda") else "cpu")
    sizes = [256] if args.dry_run else (args.rows or [16384 if table == "gpu" else 8192])
    custom = bool(args.vocab or args.hidden)
    # another K or H: the op built for it (the registry's is at the tier's); fresh processes find ops by name
    op = linear_ce_op(args.vocab, args.hidden) if custom else "linear_ce"
    rows = f"_n{'_'.join(map(str, sizes))}" if args.rows and not args.dry_run else ""
    name = (op.name if custom else op) + rows
    return run_table(name, "Fused linear cross-entropy fwd+bwd", [(op, tier, sizes)], args, device, argv=argv,
                     reps=10, default_budget_s=120 if args.dry_run else (90 if device.startswith("cuda") else 360),
                     plots=False, fresh_peak=False if custom else None)


if __name__ == "__main__":
    sys.exit(main())
