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
"""
from __future__ import annotations

import sys

from _script import parser, run_table, table_args

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
    args = p.parse_args(argv)
    device, table = table_args(args)
    tier = "quick" if args.dry_run else ("cuda" if device.startswith("cuda") else "cpu")
    sizes = [64, 96] if args.dry_run else (args.batches or (CPU_BATCHES if table == "cpu" else GPU_BATCHES))
    if args.form:
        cases = [(f"contrastive_{args.form}_m2", tier, sizes), (f"contrastive_{args.form}_m5", tier, sizes)]
    elif table == "cpu":
        cases = [("contrastive_ntxent_m5", tier, sizes)]
    else:
        cases = [("contrastive_clip_m2", tier, sizes), ("contrastive_ntxent_m5", tier, sizes)]
    name = f"contrastive_{args.form}" if args.form else "contrastive"
    title = "SCALE contrastive loss fwd+bwd" + (f", form {args.form}" if args.form else "")
    return run_table(name, title, cases, args, device, argv=argv,
                     default_budget_s=150 if args.dry_run else (170 if device.startswith("cuda") else 720),
                     plots=False)


if __name__ == "__main__":
    sys.exit(main())
