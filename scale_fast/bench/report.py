"""What a benchmark run writes: a header (machine, versions, date, command, threads, load), markdown
tables, a CSV of every record and plots (time and memory against size, one series per
implementation, each with its own marker and line style)."""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

PEERS = ("open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy", "xformers")
REPO = Path(__file__).resolve().parents[2]


def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except Exception:  # noqa: BLE001
        return "none"


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_info(device: str) -> Dict[str, Any]:
    import scale_fast as sf

    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device, "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": _pkg_version("triton") or "not installed", "scale_fast": getattr(sf, "__version__", "?"),
        "git_commit": _git_commit(), "backends": ",".join(sf.available_backends()), "loadavg": loadavg()}
    try:
        mem = [line for line in open("/proc/meminfo") if line.startswith("MemTotal")][0].split()[1]
        info["ram_gib"] = round(int(mem) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    for pkg in PEERS:
        info[pkg] = _pkg_version(pkg) or "not installed"
    return info


def device_tag(device: str) -> str:
    """cpu, or the GPU's family (h100, a100, ...) for result file names."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    for key in ("H100", "H200", "A100", "B200", "L40", "L4", "A10", "V100", "T4"):
        if key in name:
            return key.lower()
    return "cuda"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def machine_line(info: Dict[str, Any]) -> str:
    cpu = (f"CPU {info['cpu']}, {plural(info['cpu_cores'], 'core')}, torch {plural(info['torch_threads'], 'thread')}"
           + (f", {info['ram_gib']} GiB RAM" if "ram_gib" in info else ""))
    return (f"GPU {info['gpu']} ({info['gpu_mem_gib']} GiB, CUDA {info['cuda']}); " if "gpu" in info else "") + cpu


def header(title: str, info: Dict[str, Any], command: str, method: str) -> str:
    peers = ", ".join(f"{k} {info[k]}" for k in PEERS)
    lines = [f"# {title}", "",
             f"- date: {info['date_utc']}",
             f"- machine: {machine_line(info)} ({info['os']})",
             f"- versions: python {info['python']}, torch {info['torch']}, triton {info['triton']}, scale_fast "
             f"{info['scale_fast']} (git {info['git_commit']}; backends: {info['backends']})",
             f"- peers: {peers}",
             f"- command: `{command}`",
             f"- load average (1/5/15 min): {info['loadavg']} at start"
             + (f", {info['loadavg_end']} at end" if info.get("loadavg_end") else "")
             + (f"; wall time {info['wall_s']} s" if info.get("wall_s") is not None else ""),
             f"- method: {method}"]
    load0 = float(info["loadavg"].split()[0])
    if not info["device"].startswith("cuda") and load0 > 0.75 * (info["cpu_cores"] or 1):
        lines.append("- **caution**: other jobs shared this machine (load average above; the `load` column is the "
                     "1-minute load when each row started): absolute times are inflated, ratios measured minutes "
                     "apart are noisy")
    if info.get("note"):
        lines.append(f"- note: {info['note']}")
    return "\n".join(lines) + "\n"


def method_text(device: str, fresh_peak: bool) -> str:
    cuda = device.startswith("cuda")
    text = ("every row first checked against a reference run (float64 unless said; rel errs = norm of the "
            "difference over the norm of the reference, loss and max over the gradients), a disagreeing row is not "
            "timed; time = median of the repeats after warm-up (" + ("CUDA events, L2 flushed before each" if cuda
                                                                    else "perf_counter; `CPU ms` = process time")
            + "); `× base` = time over the baseline's at the same size; peak = ")
    if cuda:
        text += "max_memory_allocated minus the allocation before one fwd+bwd (gradients included)"
    else:
        text += ("growth of the resident high-water mark over one fwd+bwd (gradients included): `peak MiB` in the "
                 "benchmark process with glibc's mmap threshold pinned (it follows the live allocations)"
                 + (", `peak RSS MiB` in a fresh process with the default allocator (what a user's process grows by)"
                    if fresh_peak else ""))
    return text + "; `× mm` = useful FLOP/s over torch.mm's rate on the op's GEMM shape in the same run"


def fmt(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.1e}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
    return str(v)


def md_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(out) + "\n"


COLUMNS = ["time ms", "CPU ms", "x base", "peak MiB", "peak RSS MiB", "useful GFLOP/s", "x mm", "tokens/s",
           "loss rel err", "grad rel err", "load", "status"]
LABELS = {"x base": "× base", "x mm": "× mm"}


def op_table(op, records: List[dict], tier: str, device: str) -> str:
    """The op's section: what it computes, one table row per run (size, impl), the skipped impls listed."""
    ran = [dict(r, status=r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}")
           for r in records if r["status"] != "skipped" or r.get("reason") == "time budget exhausted"]
    skipped = {}
    for r in records:
        if r["status"] == "skipped" and r.get("reason") != "time budget exhausted":
            skipped.setdefault(r["impl"], r["reason"])
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in ran) or c == "status"]
    if device.startswith("cuda") and "load" in cols:
        cols.remove("load")
    rows = [{op.xname: r["x"], **{LABELS.get(c, c): r.get(c) for c in cols}, "impl": r["impl"]} for r in ran]
    text = f"\n## {op.name}: {op.title}\n\n{op.describe(tier, device)}\n\n"
    text += md_table([op.xname, "impl"] + [LABELS.get(c, c) for c in cols], rows)
    if skipped:
        text += "\n" + "\n".join(f"- {name}: skipped: {why}" for name, why in skipped.items()) + "\n"
    return text


CSV_KEYS = ["op", "tier", "x", "impl", "kind", "status", "reason", "time ms", "CPU ms", "reps", "samples ms", "x base",
            "peak MiB", "peak RSS MiB", "useful GFLOP/s", "mm GFLOP/s", "x mm", "tokens/s", "loss", "loss rel err",
            "grad rel err", "load"]


def write_csv(path: Path, records: List[dict], info: Dict[str, Any]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS + [f"info_{k}" for k in info])
        w.writeheader()
        for r in records:
            w.writerow({**{k: r.get(k) for k in CSV_KEYS}, **{f"info_{k}": v for k, v in info.items()}})


MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]
STYLES = {"scale_fast": "-", "naive": "--", "peer": ":"}


def plot(op, records: List[dict], path: Path, info: Dict[str, Any]) -> bool:
    """Time and peak memory against size. Each implementation has its own marker (and its kind's
    line style), so identical series stay visible; memory is on a symlog axis, where 0 is 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok" and r.get("time ms")]
    if not ok:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=80)
    names = list(dict.fromkeys(r["impl"] for r in ok))
    mem_key = "peak MiB"
    smallest = min((r[mem_key] for r in ok if r.get(mem_key)), default=1.0)
    for k, name in enumerate(names):
        rs = sorted((r for r in ok if r["impl"] == name), key=lambda r: r["x"])
        style = dict(linestyle=STYLES.get(rs[0]["kind"], "-."), marker=MARKERS[k % len(MARKERS)],
                     ms=4 + (len(names) - k) * 0.8, mfc="none" if k % 2 else None, label=name, alpha=0.85)
        axes[0].plot([r["x"] for r in rs], [r["time ms"] for r in rs], **style)
        mem = [(r["x"], r[mem_key]) for r in rs if r.get(mem_key) is not None]
        if mem:
            axes[1].plot([m[0] for m in mem], [m[1] for m in mem], **style)
    for ax, ylabel in zip(axes, ("time per fwd+bwd (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(op.xname)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("symlog", linthresh=max(min(smallest, 1.0), 1e-3))
    axes[1].set_ylim(bottom=0)
    machine = info.get("gpu") or (f"{plural(info['cpu_cores'], 'core')} CPU, "
                                  f"{plural(info['torch_threads'], 'thread')}")
    fig.suptitle(f"{op.title} — {machine}, torch {info['torch']}", fontsize=9)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_results(out_dir: Path, stem: str, text: str, records: List[dict], info: Dict[str, Any]):
    """<out_dir>/<stem>.md and .csv; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(text)
    write_csv(cs, records, info)
    return md, cs
