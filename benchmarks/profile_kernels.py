"""Per-kernel time breakdown of one fwd+bwd iteration of scale_fast's Triton losses (torch.profiler).

    python benchmarks/profile_kernels.py --device cuda            # CLIP B=8192 D=512, SCALE M=5 B=16384 D=256
    python benchmarks/profile_kernels.py --dry-run                # the same cases, tiny, on CPU (torch backend)

Each case runs warm-up iterations (autotuning included) first, then profiles one iteration; the
table lists every kernel (device time; CPU time in the dry run) with its calls and share of the
iteration, and the iteration's wall time.  Written to benchmarks/results/profile_<device>.md
(the dry run: /tmp/sf_bench_dryrun/profile_dry.md), or to --out, after every case.  bf16 inputs on CUDA (float32 in the dry run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, form, modalities, batch, width); the dry run shrinks the batch and width
CASES = [("CLIP M=2", "clip", 2, 8192, 512), ("SCALE NT-Xent M=5", "ntxent", 5, 16384, 256)]


def _case(form, M, B, D, device, dtype, backend):
    import scale_fast as sf
    from scale_fast.bench.contrastive import LOGIT_SCALE, PRESENT_RATES

    g = torch.Generator().manual_seed(1234 + B)
    emb = torch.randn(M, B, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    rates = torch.tensor(PRESENT_RATES[:M] if M > 2 else [1.0] * M)[:, None]
    present = torch.rand(M, B, generator=g) < rates
    present[0] |= ~present.any(0)
    present = present.to(device)

    def step():
        emb.grad = None
        if M > 2:
            loss = sf.scale_loss(emb, present, logit_scale=LOGIT_SCALE, form=form, backend=backend).total
        else:
            loss = sf.multi_pair_info_nce(emb, present, logit_scale=LOGIT_SCALE, form=form, backend=backend).sum()
        loss.backward()
    return step


def profile_case(name, step, cuda: bool, warmup: int):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if cuda and getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        if t > 0:
            rows.append((ev.key, ev.count, t))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows) or 1.0
    out = [f"### {name}: one iteration {wall * 1e3:.3f} ms wall, {total / 1e3:.3f} ms in "
           f"{'kernels (device time)' if cuda else 'ops (CPU self time)'}", "",
           "| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for key, n, t in rows[:25]:
        out.append(f"| `{key[:90]}` | {n} | {t / 1e3:.3f} | {100 * t / total:.1f}% |")
    if len(rows) > 25:
        rest = sum(r[2] for r in rows[25:])
        out.append(f"| ({len(rows) - 25} more) | | {rest / 1e3:.3f} | {100 * rest / total:.1f}% |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny cases on the CPU (torch backend): checks the script")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="the Markdown file (default benchmarks/results/profile_<device>.md)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda") and not args.dry_run
    if args.device.startswith("cuda") and not args.dry_run and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --dry-run)")
    device = args.device if cuda else "cpu"
    dtype, backend = (torch.bfloat16, "triton") if cuda else (torch.float32, "torch")
    head = [f"# Per-kernel time of one fwd+bwd iteration (torch.profiler), backend {backend}, {dtype}",
            "", f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command: python benchmarks/profile_kernels.py "
            + " ".join(argv if argv is not None else sys.argv[1:]), ""]
    out = args.out or (os.path.join("/tmp/sf_bench_dryrun", "profile_dry.md") if args.dry_run else
                       os.path.join(ROOT, "benchmarks", "results", f"profile_{args.device.split(':')[0]}.md"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = "\n".join(head) + "\n"
    for name, form, M, B, D in CASES:
        if args.dry_run:
            B, D = 64, 32
        label = f"{name} B={B} D={D}"
        try:
            part = profile_case(label, _case(form, M, B, D, device, dtype, backend), cuda, args.warmup)
        except Exception as exc:  # noqa: BLE001  (an OOM or a failure is a row of the report)
            part = f"### {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}\n"
        print(part, flush=True)
        text += "\n" + part
        with open(out, "w") as f:  # written after every case: an early stop keeps what is done
            f.write(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
