"""The CPU benchmark job: both CPU tables, one after the other.

    python benchmarks/run_cpu.py                      # threads picked from the load ("auto")
    python benchmarks/run_cpu.py --threads 2          # any option is passed to both scripts

Writes benchmarks/results/linear_ce_cpu.{md,csv} and contrastive_cpu.{md,csv} (machine,
versions, date and load average in each) and prints both tables.  The GPU tables come from
``--device cuda`` runs of the same scripts (benchmarks/gpu_check.sh on the GPU machine).
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--threads" or a.startswith("--threads=") for a in argv):
        argv = ["--threads", "auto", *argv]
    rcs = []
    for script in ("bench_linear_ce.py", "bench_contrastive.py"):
        cmd = [sys.executable, os.path.join(HERE, script), "--device", "cpu", *argv]
        print("$", " ".join(cmd), flush=True)
        rcs.append(subprocess.call(cmd))
    return max(rcs)


if __name__ == "__main__":
    sys.exit(main())
