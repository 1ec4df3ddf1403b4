"""What the scripts of this folder share: scale_fast.bench imported (the installed package first,
else this source tree), their common flags, one call that runs a table and writes it, and one that
runs a script's measurement in a fresh process."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
try:
    import scale_fast.bench as bench   # noqa: F401
except ImportError:                    # a source checkout without `pip install -e .`
    sys.path.insert(0, str(RESULTS.parents[1]))
    import scale_fast.bench as bench   # noqa: F401,E402


def parser(description: str) -> argparse.ArgumentParser:
    """The flags of bench_contrastive.py and bench_linear_ce.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true",
                   help="the chosen device's table at tiny sizes on CPU (CUDA-only rows listed as skipped); "
                        "written to /tmp/sf_bench_dryrun")
    p.add_argument("--budget-s", type=float, default=None, help="overall wall-clock budget of the table")
    p.add_argument("--case-budget-s", type=float, default=None, help="timing budget of one row")
    p.add_argument("--out-dir", default=None, help="where the .md/.csv go (default benchmarks/results)")
    p.add_argument("--note", default=None, help="a line of context written into the table's header")
    p.add_argument("--only", default=None, help="comma-separated implementation names (or parts) to run")
    p.add_argument("--threads", default=None,
                   help="torch CPU threads (default: torch's). On a shared, loaded machine use 1; 'auto': the cores "
                        "the 1-minute load average leaves free, at least 1")
    p.add_argument("--table", choices=["cpu", "gpu"], default=None,
                   help="which table (default: gpu on CUDA or with --dry-run, else cpu)")
    return p


def table_args(args):
    """(device, table) from the common flags; threads set."""
    bench.set_threads(args.threads)
    device = "cpu" if args.dry_run else bench.command.resolve_device(args.device)
    table = args.table or ("gpu" if device.startswith("cuda") or args.dry_run else "cpu")
    return device, table


def run_table(name: str, title: str, cases, args, device: str, *, argv, reps: int = 7, default_budget_s: float,
              fresh_peak=None, timed: bool = True, baseline=None, out_dir=None, stem=None, plots: bool = True) -> int:
    """Run cases [(op, tier, sizes)], write <out>/<name>_<device tag>.md/.csv (+ plots), print the table."""
    dry = getattr(args, "dry_run", False)
    cuda = device.startswith("cuda")
    result = bench.tables(
        cases, device=device, title=title + (" — DRY RUN (tiny sizes, not a measurement)" if dry else ""),
        command=f"python benchmarks/{os.path.basename(sys.argv[0]) or name} {' '.join(argv)}".strip(),
        reps=reps, warmup=1, impl_filter=set(args.only.split(",")) if getattr(args, "only", None) else None,
        row_budget_s=getattr(args, "case_budget_s", None) or (3.0 if cuda else 25.0),
        budget_s=getattr(args, "budget_s", None) or default_budget_s,
        fresh_peak=(not cuda and not dry) if fresh_peak is None else fresh_peak, timed=timed, baseline=baseline,
        note=getattr(args, "note", None))
    out = Path(out_dir or getattr(args, "out_dir", None) or ("/tmp/sf_bench_dryrun" if dry else RESULTS))
    tag = bench.report.device_tag(device) + ("_dryrun" if dry else "")
    paths = bench.write(result, out, stem or f"{name}_{tag}", plots=plots)
    print(result["text"])
    print("written: " + " ".join(str(p) for p in paths))
    return 0


def run_child(script: str, args) -> dict:
    """`python script *args` in a fresh process: its last stdout line that is a JSON object, or {"error": ...}."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])
