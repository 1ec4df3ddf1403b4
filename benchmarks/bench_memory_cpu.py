"""Peak memory of one SCALE contrastive fwd+bwd on the CPU, every scale_fast backend.

``sf.scale_loss(embeddings[5, B, 256], present)`` (the op ``contrastive_ntxent_m5`` of
``scale-fast bench``, CPU tier), float32, one thread: the peak of one call in the benchmark
process with glibc's mmap threshold pinned (it follows the live allocations) and the peak RSS
growth of a fresh process (what a user's process grows by), both including the embedding
gradient. No times.

    python benchmarks/bench_memory_cpu.py            # B = 4096 and 16384
    python benchmarks/bench_memory_cpu.py 1024 2048
"""
from __future__ import annotations

import sys

from _script import bench, run_table


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sizes = [int(a) for a in argv] or [4096, 16384]
    bench.set_threads(1)

    class Args:
        only = "scale_fast"
    return run_table("contrastive_memory", "SCALE contrastive fwd+bwd: peak memory, CPU",
                     [("contrastive_ntxent_m5", "cpu", sizes)], Args, "cpu", argv=argv, default_budget_s=3600,
                     fresh_peak=True, timed=False, plots=False)


if __name__ == "__main__":
    sys.exit(main())
