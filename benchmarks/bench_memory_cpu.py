"""Peak allocated memory of one SCALE contrastive fwd+bwd on the CPU (backend="torch").

The CPU tables measure peak *resident* memory, which also counts what glibc's
allocator keeps after a free (its mmap threshold grows with every large free,
so freed tiles stay in the heap).  Here each case runs in a fresh process with
MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so every tensor above that size is
mapped and unmapped on its own and the resident high-water mark follows the
live allocations.  That slows the run (page faults), so no times are reported.

    python benchmarks/bench_memory_cpu.py            # B = 4096 and 16384
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PRESENT_RATES = [1.0, 0.95, 0.8, 0.3, 0.2]
M, D = 5, 256


def child(B: int) -> None:
    import torch

    import common
    import scale_fast as sf

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    present = torch.rand(M, B, generator=g) < torch.tensor(PRESENT_RATES)[:, None]
    e = torch.randn(M, B, D, generator=g, requires_grad=True)

    def step(emb, pres):
        sf.scale_loss(emb, pres, backend="torch").total.backward()

    step(torch.randn(M, 64, D, requires_grad=True), present[:, :64])  # warm-up: code pages, thread pools
    extra, _, _ = common.peak_extra_cpu(lambda: step(e, present))
    print(json.dumps({"B": B, "peak_extra_mib": extra / 2**20, "grad_mib": e.numel() * 4 / 2**20}))


def main() -> None:
    import common

    sizes = [int(a) for a in sys.argv[1:]] or [4096, 16384]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": HERE}
    rows = []
    for B in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(B)], env=env, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else ""
        rec = json.loads(line) if line.startswith("{") else {"B": B, "error": out.stderr[-300:]}
        rows.append(rec)
        print(rec, flush=True)
    info = common.machine_info("cpu")
    text = common.header_markdown("SCALE contrastive fwd+bwd: peak allocated memory, CPU", info,
                                  "python benchmarks/bench_memory_cpu.py " + " ".join(map(str, sizes)))
    text += ("\n`sf.scale_loss(embeddings[M,B,D], present)` with backend=\"torch\", M=5, D=256, float32, present "
             f"rates {PRESENT_RATES}, one fwd+bwd after a small warm-up call, in a fresh process with "
             "MALLOC_MMAP_THRESHOLD_=65536. Peak extra = VmHWM growth over VmRSS before the call; it includes "
             "the embedding gradient (listed separately).\n\n")
    text += common.md_table(["B", "peak extra MiB", "of which embedding gradient MiB"],
                            [{"B": r["B"], "peak extra MiB": common.fmt(r.get("peak_extra_mib")),
                              "of which embedding gradient MiB": common.fmt(r.get("grad_mib"))} for r in rows])
    print(text)
    common.write_results("contrastive_memory", "cpu", text, rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main()
