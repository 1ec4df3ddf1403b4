"""OpenCLIP's losses, original vs patched by scale_fast.integrations.open_clip, on CPU (needs open_clip:
run it in the environment of tests/test_open_clip.py, e.g. .venv-openclip).

step:   one training step (forward, ClipLoss, backward, SGD) of a small CLIP made from a config (no
        weights) at growing batch; each row in a fresh process: peak RSS growth of the step over the
        resident memory before it (model, gradients and optimizer already allocated by a first step),
        and the median time of 3 steps.
siglip: SigLipLoss fwd+bwd of unit features [N / W, D] per rank, W gloo processes (W = 2, 3), at large
        global batches N: peak RSS growth per rank (the largest rank's), median time of 2 calls.

    HF_HUB_OFFLINE=1 .venv-openclip/bin/python benchmarks/bench_open_clip.py step --batches 512 2048 8192
    HF_HUB_OFFLINE=1 .venv-openclip/bin/python benchmarks/bench_open_clip.py siglip --worlds 2 3 --batches 6144 12288
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from _script import RESULTS
from scale_fast.bench import measure, report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = dict(embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
             text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2))
SIGLIP_D = 512


def _loss(kind: str, impl: str, **kw):
    import open_clip.loss as oc_loss
    from scale_fast.integrations import open_clip as sf_open_clip

    if impl == "original":
        return getattr(oc_loss, kind)(**kw)
    with sf_open_clip.patched(backend="auto"):
        return getattr(oc_loss, kind)(**kw)


def step_row(impl: str, batch: int) -> dict:
    import torch
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(**MODEL, output_dict=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = _loss("ClipLoss", impl)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (batch, 16), generator=g)
    values = []

    def step():
        opt.zero_grad(set_to_none=False)
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        values.append(float(loss))

    step()  # gradients and optimizer state exist before the measured step
    peak = measure.peak_extra(step, "cpu")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(peak=peak, ms=1e3 * statistics.median(times), loss=values[0])


def _siglip_worker(rank, world, port, batch, impl, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = batch // world
    g = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(n, SIGLIP_D, generator=g), dim=-1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(n, SIGLIP_D, generator=g), dim=-1).requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss_fn = _loss("SigLipLoss", impl, rank=rank, world_size=world)
    values = []

    def call():
        loss = loss_fn(img, txt, scale, bias)
        loss.backward()
        values.append(float(loss))

    dist.barrier()
    peak = measure.peak_extra(call, "cpu")
    times = []
    for _ in range(2):
        dist.barrier()
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(dict(peak=peak, ms=1e3 * statistics.median(times), loss=values[0]), f)
    dist.destroy_process_group()


def siglip_row(impl: str, batch: int, world: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(prefix="sf_siglip_")
    mp.spawn(_siglip_worker, args=(world, port, batch, impl, out), nprocs=world, join=True)
    rows = []
    for r in range(world):
        with open(f"{out}.{r}") as f:
            rows.append(json.load(f))
        os.remove(f"{out}.{r}")
    return dict(peak=max(r["peak"] for r in rows), ms=max(r["ms"] for r in rows), loss=rows[0]["loss"])


def _fresh(argv) -> dict:
    """One row in a fresh process (its own high-water mark and allocator)."""
    res = subprocess.run([sys.executable, __file__, "--row", *map(str, argv)], capture_output=True, text=True)
    if res.returncode:
        return dict(error=(res.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mib(x):
    return "n/a" if x is None else f"{x / 2 ** 20:,.0f}"


def _table(title, method, rows, columns, argv, name):
    import torch

    torch.set_num_threads(1)
    info = measure_info()
    text = report.header(title, info, f"HF_HUB_OFFLINE=1 python benchmarks/bench_open_clip.py {' '.join(argv)}",
                         method).replace("; the `load` column is the 1-minute load when each row started", "")
    text += "\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    text += "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows) + "\n"
    path = RESULTS / f"{name}_cpu.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


def measure_info():
    import open_clip

    info = report.machine_info("cpu")
    info["note"] = f"open_clip {open_clip.__version__}; 1 torch thread per process"
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--row":
        import torch
        torch.set_num_threads(1)
        kind, impl, batch = argv[1], argv[2], int(argv[3])
        row = step_row(impl, batch) if kind == "step" else siglip_row(impl, batch, int(argv[4]))
        print(json.dumps(row))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["step", "siglip"])
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    args = p.parse_args(argv)
    rows = []
    if args.what == "step":
        for batch in args.batches or [512, 2048, 8192]:
            got = {impl: _fresh(["step", impl, batch]) for impl in ("original", "patched")}
            rows.append(_row([batch], got))
        _table("OpenCLIP training step, ClipLoss original vs patched (CPU)",
               "a small CLIP from a config (embed 64, ViT 2x64 on 32 px / patch 8, text 2x64, context 16), float32; "
               "a fresh process per row: peak RSS growth (VmHWM over VmRSS) of one step after a first one, "
               "median of 3 steps", rows, ["batch", "original peak MiB", "patched peak MiB", "memory ratio",
                                           "original ms", "patched ms", "time ratio", "loss rel diff"],
               argv, "open_clip_step")
    else:
        for world in args.worlds:
            for batch in args.batches or [6144, 12288]:
                got = {impl: _fresh(["siglip", impl, batch, world]) for impl in ("original", "patched")}
                rows.append(_row([world, batch], got))
        _table("OpenCLIP SigLipLoss over gloo processes, original vs patched (CPU)",
               f"unit features [N / W, {SIGLIP_D}] float32 per rank, dist_impl 'bidir', fwd+bwd; fresh processes "
               "per row: the largest rank's peak RSS growth of one call, the slowest rank's median of 2 calls",
               rows, ["processes", "global batch", "original peak MiB / rank", "patched peak MiB / rank",
                      "memory ratio", "original ms", "patched ms", "time ratio", "loss rel diff"], argv,
               "open_clip_siglip")
    return 0


def _row(label, got):
    o, p = got["original"], got["patched"]
    if "error" in o or "error" in p:
        return label + [o.get("error", _mib(o.get("peak"))), p.get("error", _mib(p.get("peak"))), "", "", "", "", ""]
    ratio = f"{p['peak'] / o['peak']:.3f}" if o["peak"] else "n/a"
    diff = abs(p["loss"] - o["loss"]) / max(abs(o["loss"]), 1e-30)
    return label + [_mib(o["peak"]), _mib(p["peak"]), ratio, f"{o['ms']:,.0f}", f"{p['ms']:,.0f}",
            f"{p['ms'] / o['ms']:.2f}", f"{diff:.1e}"]


if __name__ == "__main__":
    sys.exit(main())
