"""`scale-fast bench`, and `tables()`, the engine it shares with the scripts of benchmarks/."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..argtypes import UsageError
from . import measure, report
from .op import Op
from .runner import add_ratios, all_ops, run_op


NO_PLOTS = "matplotlib is not installed: no plots (pip install 'scale_fast[bench]')"


def set_threads(value) -> int:
    """torch CPU threads: a number, "auto" (the cores the 1-minute load average leaves free, at least
    1: OpenMP threads spin-waiting for a busy core make multi-threaded timings meaningless) or
    None / "torch" (torch's default)."""
    if value == "auto":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0])))
    elif value not in (None, "torch"):
        torch.set_num_threads(int(value))
    return torch.get_num_threads()


def resolve_device(device: Optional[str]) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here")
        torch.backends.cuda.matmul.allow_tf32 = False   # exact float32 products in the agreement checks
    return device


def tables(cases: Sequence[Tuple[str, str, List[int]]], *, device: str, title: str, command: str,
           reps: int, warmup: int, impl_filter: Optional[set] = None, row_budget_s: Optional[float] = None,
           budget_s: Optional[float] = None, fresh_peak: bool = False, timed: bool = True,
           baseline: Optional[str] = None, note: Optional[str] = None, log=None) -> Dict[str, Any]:
    """Run cases [(op name or Op, tier, sizes)] (a 4th element overrides `reps` for that case) and
    build the report: {records, text, info, ops}."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    measure.pin_malloc()
    ops = dict(all_ops())
    info = report.machine_info(device)
    if note:
        info["note"] = note
    t0 = time.time()
    deadline = None if budget_s is None else t0 + budget_s
    records: List[dict] = []
    texts = []
    for name, tier, sizes, *case_reps in cases:
        op = name if isinstance(name, Op) else ops[name]
        ops.setdefault(op.name, op)  # an Op built for this table (e.g. another width) is reported too
        log(f"[{op.name}] {op.xname} in {list(sizes)}, tier {tier}")
        recs = run_op(op, device, tier, sizes, reps=case_reps[0] if case_reps else reps, warmup=warmup, impl_filter=impl_filter,
                      row_budget_s=row_budget_s, deadline=deadline, fresh_peak=fresh_peak, timed=timed, log=log)
        if baseline:
            add_ratios(op, recs, baseline)
        records += recs
        texts.append(report.op_table(op, recs, tier, device))
        log(f"[{op.name}] done at {time.time() - t0:.1f} s")
    info["wall_s"] = round(time.time() - t0, 1)
    info["loadavg_end"] = report.loadavg()
    method = report.method_text(device, fresh_peak)
    if baseline:
        method += f"; baseline of `× base`: {baseline}"
    text = report.header(title, info, command, method) + "".join(texts)
    return {"records": records, "text": text, "info": info, "ops": ops}


def write(result: Dict[str, Any], out: Path, stem: str, *, plots: bool) -> List[Path]:
    """<out>/<stem>.md, .csv and (with matplotlib, when asked) <stem>_<op>.png; returns the paths."""
    text, records, info = result["text"], result["records"], result["info"]
    written = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            text += f"\n{NO_PLOTS}\n"
            print(f"scale-fast bench: {NO_PLOTS}", file=sys.stderr, flush=True)
        else:
            for name in dict.fromkeys(r["op"] for r in records):
                png = out / f"{stem}_{name}.png"
                out.mkdir(parents=True, exist_ok=True)
                if report.plot(result["ops"][name], [r for r in records if r["op"] == name], png, info):
                    written.append(png)
            if written:
                text += "\nplots: " + ", ".join(p.name for p in written) + "\n"
    result["text"] = text
    return list(report.write_results(out, stem, text, records, info)) + written


# ------------------------------------------------------------------ the command
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all): " + ", ".join(all_ops()))
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 2 min on a 2-core CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (B or N) replacing each op's defaults")
    p.add_argument("--impls", default=None, help="comma-separated implementation names (or parts of names)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats (default 3 with --quick, else 7)")
    p.add_argument("--warmup", type=int, default=None,
                   help="more untimed calls right before the repeats (default 0 with --quick, else 1); the agreement "
                        "check and the memory call always come first, untimed")
    p.add_argument("--row-budget-s", type=float, default=None,
                   help="fewer repeats (at least 1) where reps x one call would exceed this (default 1 with --quick, "
                        "else 20)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, 'auto' (default: the cores the 1-minute load average leaves "
                        "free, at least 1) or 'torch' (torch's default)")
    p.add_argument("--fresh-peak", choices=["auto", "on", "off"], default="auto",
                   help="on CPU, also measure each row's peak RSS in a fresh process (default: on, off with --quick)")
    p.add_argument("--out", default=None, help="folder for bench.md, bench.csv and bench_<op>.png")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--list", action="store_true", help="list the ops and their implementations, then exit")
    return p


def run(args) -> Dict[str, Any]:
    set_threads(args.threads)
    device = resolve_device(args.device)
    ops = all_ops()
    names = [n.strip() for n in args.ops.split(",")] if args.ops else list(ops)
    unknown = [n for n in names if n not in ops]
    if unknown:
        raise UsageError(f"--ops: unknown op(s) {', '.join(unknown)}; choose among {', '.join(ops)}")
    if args.list:
        for n in names:
            print(n + ": " + "; ".join(i.name + (f" (skipped: {i.skip})" if i.skip else "")
                                       for i in ops[n].impls(device)))
        return {}
    tier = "quick" if args.quick else ("cuda" if device.startswith("cuda") else "cpu")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    result = tables([(n, tier, sizes or ops[n].sizes[tier]) for n in names], device=device, title="scale-fast bench",
                    command=("scale-fast bench " + " ".join(getattr(args, "argv", []) or [])).strip(),
                    reps=args.reps or (3 if args.quick else 7),
                    warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
                    impl_filter=set(s.strip() for s in args.impls.split(",")) if args.impls else None,
                    row_budget_s=args.row_budget_s or (1.0 if args.quick else 20.0),
                    fresh_peak=args.fresh_peak == "on" or (args.fresh_peak == "auto" and not args.quick))
    paths = write(result, Path(args.out), "bench", plots=not args.no_plots) if args.out else []
    print(result["text"])
    if paths:
        print("written: " + ", ".join(str(p) for p in paths))
    return result


def main(argv: Optional[List[str]] = None, parser_class=argparse.ArgumentParser) -> int:
    """`scale-fast bench ARGV`; a mistake is a UsageError with parser_class=scale_fast.cli.Parser, else
    argparse's usage message and exit status 2."""
    p = add_arguments(parser_class(prog="scale-fast bench",
                                   description="time and memory of the ops against naive PyTorch and installed peers"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except UsageError as e:
        p.error(str(e))  # scale_fast.cli.Parser raises it again
    return 0
