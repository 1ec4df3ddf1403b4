"""JCT throughput: absent modalities removed ("drop") against the paper's zero imputation ("zero").

One batch of the synthetic world's default products (so its missing rates and lengths);
the JointCoTransformer alone, forward + backward (the gradient of a fixed random
projection of all outputs), for each way of handling absent modalities:

  zero   the paper: absent modalities' tokens (zero inputs) are attended; padding masked
  mask   absent tokens kept in the tensors but masked out of attention
  drop   absent and padding tokens removed: token-wise layers on the kept tokens only

tokens/s = B x T / time, T the concatenated padded length of the batch (the tokens
"zero" processes), so the drop/zero ratio is the speedup on the same batch.  Two
paddings: each modality padded to the batch's longest ("batch-max") and to SCALE's
fixed lengths 36/64/37/13/81 as in the released code ("SCALE fixed").  Timings are
medians over interleaved repeats (zero, mask, drop, zero, ...) after warm-up.

    python benchmarks/bench_jct.py            # writes benchmarks/results/jct_cpu.md (+ .csv)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_markdown, machine_info, md_table, write_results  # noqa: E402

from scale_fast.data import SyntheticProducts, collate  # noqa: E402
from scale_fast.model import MODALITIES, JointCoTransformer, SCALEConfig  # noqa: E402

SIZES = {  # name: (dim, depth, heads)
    "tiny": (64, 2, 2),    # SCALEConfig.tiny(): the JCT of `scale-fast pretrain`
    "small": (256, 2, 4),
    "base": (768, 6, 8),   # SCALE's JCT (SCALEConfig()); for GPUs: --sizes base
}


def inputs(batch, cfg: SCALEConfig, dim: int, fixed: bool, device, generator):
    tokens, valid = [], []
    B = batch.size
    for m in MODALITIES:
        v = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch.valid(m)], dim=1)
        if fixed:  # pad to SCALE's fixed length
            L = cfg.seq_len(m)
            v = torch.cat([v, torch.zeros(B, L - v.shape[1], dtype=torch.bool)], dim=1)
        valid.append(v.to(device))
        tokens.append(torch.randn(B, v.shape[1], dim, generator=generator).to(device).requires_grad_())
    return tokens, valid, batch.present.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sizes", default="tiny,small",
                   help="comma-separated names among " + ", ".join(SIZES))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = SCALEConfig.tiny()
    data = SyntheticProducts(args.batch_size, seed=4242, world_seed=0, config=cfg)
    batch = collate([data[i] for i in range(len(data))], cfg)
    info = machine_info(args.device)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name in args.sizes.split(","):
        dim, depth, heads = SIZES[name]
        torch.manual_seed(0)
        jct = JointCoTransformer(dim, depth, heads, [cfg.seq_len(m) for m in MODALITIES], mlp_ratio=2.0,
                                 attention="auto").to(device)
        for fixed in (False, True):
            tokens, valid, present = inputs(batch, cfg, dim, fixed, device, g)
            B, T = args.batch_size, sum(t.shape[1] for t in tokens)
            proj = torch.randn(dim, generator=g).to(device)

            def step(missing):
                for t in tokens:
                    t.grad = None
                jct.zero_grad(set_to_none=True)
                out = jct(tokens, valid, present, missing=missing)
                loss = sum((o @ proj).sum() for o in out.tokens)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            modes = ("zero", "mask", "drop")
            for mode in modes:  # warm-up
                step(mode)
            times = {mode: [] for mode in modes}
            for _ in range(args.reps):
                for mode in modes:
                    t0 = time.perf_counter()
                    step(mode)
                    times[mode].append(time.perf_counter() - t0)
            med = {mode: statistics.median(ts) for mode, ts in times.items()}
            kept = int(jct.keep_mask(valid, present, "drop").sum())
            attended_zero = int(jct.keep_mask(valid, present, "zero").sum())
            row = {
                "JCT (dim, layers, heads)": f"{name} ({dim}, {depth}, {heads})",
                "padding": "SCALE fixed" if fixed else "batch-max",
                "B": B, "T": T,
                "kept tokens %": 100.0 * kept / (B * T),
                "zero-attended %": 100.0 * attended_zero / (B * T),
                "zero ms": med["zero"] * 1e3, "mask ms": med["mask"] * 1e3, "drop ms": med["drop"] * 1e3,
                "zero tokens/s": B * T / med["zero"], "drop tokens/s": B * T / med["drop"],
                "drop/zero": med["zero"] / med["drop"],
            }
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python benchmarks/bench_jct.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = header_markdown("JCT fwd+bwd throughput: drop vs zero imputation", info, command.strip())
    text += (f"\nOne batch of {args.batch_size} products of the synthetic world (world_seed 0): text always, image 85%, "
             "table 80%, video 30%, audio 20% present. tokens/s = B x T / median time of forward + backward "
             f"({args.reps} interleaved repeats after warm-up); T = concatenated padded length, so drop/zero is the "
             "speedup on the same batch. Attention: "
             f"{'xformers' if jct.attention == 'xformers' else 'torch SDPA'} ({jct.attention}).\n\n")
    cols = list(rows[0].keys())
    text += md_table(cols, rows)
    tag = "cpu" if device.type == "cpu" else "cuda"
    md, _ = write_results("jct", tag, text, rows, Path(args.out) if args.out else None)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
