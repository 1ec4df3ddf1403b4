"""Benchmark of the SCALE contrastive loss (fwd+bwd): scale_fast vs naive PyTorch and peers.

CPU table (default without CUDA): ``sf.scale_loss`` (M=5, D=256, form ntxent, S' weights,
sample mode, modalities missing at rates text 1.0, image 0.95, table 0.8, video 0.3, audio 0.2),
the scale_fast backends vs the naive materialized float32 loss, B = 512 ... 16384.
GPU table (``--device cuda``), bf16, D=512: M=2 clip (``sf.multi_pair_info_nce``) vs naive,
OpenCLIP ``ClipLoss`` and Inf-CL, and the M=5 SCALE loss vs naive, B = 8k ... 64k.
``--form F`` (ntxent, clip, siglip): instead, form F's two rows on either device, M=2 (with its
peers: OpenCLIP ``ClipLoss`` / ``SigLipLoss``) and M=5, written to ``contrastive_F_<device>``.

The ops are those of ``scale-fast bench`` (scale_fast/bench/contrastive.py); every row is checked
against a reference before it is timed (see scale_fast/bench/runner.py).

    python benchmarks/bench_contrastive.py                 # CPU table
    python benchmarks/bench_contrastive.py --device cuda   # GPU table
    python benchmarks/bench_contrastive.py --dry-run       # the GPU table's ops, tiny, on CPU
    python benchmarks/bench_contrastive.py --form siglip   # sigmoid loss vs OpenCLIP SigLipLoss and naive
    python benchmarks/bench_contrastive.py --device cuda --dim 256 --modalities 5   # the SCALE loss at D=256
"""
from __future__ import annotations

import sys

from _script import parser, run_table, table_args

from scale_fast.bench.contrastive import contrastive_op

CPU_BATCHES = [512, 1024, 2048, 4096, 8192, 16384]
GPU_BATCHES = [8192, 16384, 32768, 65536]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma-separated batch sizes (default: the table's own list)")
    p.add_argument("--form", choices=["ntxent", "clip", "siglip"], default=None,
                   help="only this form's rows, M=2 (with its peers) and M=5, written to contrastive_<form>_<device> "
                        "(default: the table above)")
    p.add_argument("--dim", type=int, default=None,
                   help="embedding width D of every row (default: the table's, 256 on CPU, 512 on CUDA); the table is "
                        "written to contrastive[_<form>]_d<D>_<device>")
    p.add_argument("--modalities", type=int, choices=[2, 5], default=None,
                   help="only the rows with this many modalities (2: the pair loss, 5: the SCALE loss)")
    args = p.parse_args(argv)
    if args.dim is not None and args.dim < 1:
        p.error(f"--dim must be a positive integer, got {args.dim}")
    device, table = table_args(args)
    tier = "quick" if args.dry_run else ("cuda" if device.startswith("cuda") else "cpu")
    sizes = [64, 96] if args.dry_run else (args.batches or (CPU_BATCHES if table == "cpu" else GPU_BATCHES))
    if args.form:
        rows = [(args.form, 2), (args.form, 5)]
    elif table == "cpu":
        rows = [("ntxent", 5)]
    else:
        rows = [("clip", 2), ("ntxent", 5)]
    rows = [(form, M) for form, M in rows if args.modalities in (None, M)]
    if not rows:
        p.error(f"--modalities {args.modalities}: this table has no such rows")
    # another width: the ops built for it (the registry's are at the tier's width)
    cases = [(contrastive_op(form, M, args.dim) if args.dim else f"contrastive_{form}_m{M}", tier, sizes)
             for form, M in rows]
    name = ("contrastive" + (f"_{args.form}" if args.form else "") + (f"_d{args.dim}" if args.dim else "")
            + (f"_m{args.modalities}" if args.modalities else ""))
    title = ("SCALE contrastive loss fwd+bwd" + (f", form {args.form}" if args.form else "")
             + (f", D={args.dim}" if args.dim else ""))
    return run_table(name, title, cases, args, device, argv=argv,
                     default_budget_s=150 if args.dry_run else (170 if device.startswith("cuda") else 720),
                     plots=False, fresh_peak=False if args.dim else None)  # fresh processes find ops by name


if __name__ == "__main__":
    sys.exit(main())
