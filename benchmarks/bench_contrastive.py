"""Benchmark of the SCALE contrastive loss (fwd+bwd): scale_fast vs naive PyTorch and peers.

CPU table (default without CUDA): ``sf.scale_loss`` contrastive part (M=5, D=256, form
ntxent, S' harmonization, sample mode, modalities missing at rates text 1.0, image 0.95,
table 0.8, video 0.3, audio 0.2, fixed seed), backend="torch" vs the naive materialized
float32 implementation (benchmarks/naive.py), B = 512 ... 16384.

GPU table (``--device cuda``, the default when CUDA is there), bf16, D=512, all present:
- M=2, form clip, no S' weights (``sf.multi_pair_info_nce``): backend="triton" vs naive
  torch, OpenCLIP ``ClipLoss`` and Inf-CL ``cal_inf_loss`` (both directions, averaged);
- M=5, SCALE contrastive (``sf.scale_loss``, ntxent, S' weights): triton vs naive torch;
B = 8k, 16k, 32k, 64k; backend="torch" rows last, as far as the time budget goes.

Every result is checked against an independent float32 reference (the naive loss,
row-chunked with checkpointing where the materialized one would not fit) before it is
timed: relative error of the loss and of the embedding gradient.

Useful FLOPs of one fwd+bwd: ntxent sum over active pairs of 6 (2n)^2 D, clip 6 n^2 D
(one logits GEMM forward, two backward); the torch.mm row of each B is the rate of
torch.mm on the same (2n x D) @ (D x 2n) (clip: n x D @ D x n) product in the same run.

    python benchmarks/bench_contrastive.py                 # CPU table (~6-8 min on 2 cores)
    python benchmarks/bench_contrastive.py --device cuda   # GPU table
    python benchmarks/bench_contrastive.py --dry-run       # GPU-table code paths, tiny, on CPU
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import naive  # noqa: E402

NAME = "contrastive"
LOGIT_SCALE = 1 / 0.07
PRESENT_RATES = [1.0, 0.95, 0.8, 0.3, 0.2]          # text, image, table, video, audio
CPU_BATCHES = [512, 1024, 2048, 4096, 8192, 16384]
GPU_BATCHES = [8192, 16384, 32768, 65536]
CPU_NAIVE_LIMIT = 12 * 2 ** 30


# ------------------------------------------------------------------ cases
def build_cases(args) -> list[dict]:
    table = args.table
    dry = args.dry_run
    only = set(args.only.split(",")) if args.only else None
    cases: list[dict] = []

    def add(**kw):
        if only and kw["impl"] not in only and kw["role"] != "ref":
            return
        cases.append(kw)

    if table == "cpu":
        Bs = [64, 96] if dry else (args.batches or CPU_BATCHES)
        if not dry:   # the targets' sizes first (B <= 4096, then 16384), the naive 8192 (slowest) last
            Bs = [b for b in Bs if b <= 4096] + [b for b in Bs if b > 8192] + [b for b in Bs if b == 8192]
        for B in Bs:
            g = dict(group=f"scale M=5 B={B}", op="scale", form="ntxent", M=5, B=B, D=32 if dry else 256,
                     dtype="float32", rates=PRESENT_RATES)
            add(**g, impl="naive", role="impl+ref")
            add(**g, impl="ref", role="ref")                 # runs only if naive was skipped
            add(**g, impl="scale_fast torch", backend="torch", role="impl")
            add(**g, impl="torch.mm", role="mm")
    else:
        Bs = [64, 96] if dry else (args.batches or GPU_BATCHES)
        D = 256 if dry else 512          # inf-cl needs D to be a multiple of its head_dim (256)
        tri = "torch" if dry else "triton"
        later = []
        for B in Bs:
            g2 = dict(group=f"clip M=2 B={B}", op="clip", form="clip", M=2, B=B, D=D, dtype="bfloat16",
                      rates=[1.0, 1.0])
            add(**g2, impl="ref", role="ref")
            add(**g2, impl=f"scale_fast {'triton' if not dry else 'torch (triton in dry run)'}",
                backend=tri, role="impl")
            add(**g2, impl="open_clip ClipLoss", role="impl")
            add(**g2, impl="inf_cl cal_inf_loss x2", role="impl")
            add(**g2, impl="naive", role="impl")
            add(**g2, impl="torch.mm", role="mm")
            g5 = dict(group=f"scale M=5 B={B}", op="scale", form="ntxent", M=5, B=B, D=D, dtype="bfloat16",
                      rates=[1.0] * 5)
            add(**g5, impl="ref", role="ref")
            add(**g5, impl=f"scale_fast {'triton' if not dry else 'torch (triton in dry run)'}",
                backend=tri, role="impl")
            add(**g5, impl="naive", role="impl")
            add(**g5, impl="torch.mm", role="mm")
            if not dry:
                later.append(dict(**g2, impl="scale_fast torch", backend="torch", role="impl"))
                later.append(dict(**g5, impl="scale_fast torch", backend="torch", role="impl"))
        for c in later:
            if not only or c["impl"] in only:
                cases.append(c)
    return cases


# ------------------------------------------------------------------ inputs
def make_inputs(case, device, B=None):
    B = B or case["B"]
    M, D = case["M"], case["D"]
    dtype = getattr(torch, case["dtype"])
    gdev = "cuda" if str(device).startswith("cuda") else "cpu"   # same seed, same device: same data
    g = torch.Generator(device=gdev).manual_seed(1234 + B)
    emb = torch.randn(M, B, D, generator=g, device=gdev)
    rates = torch.tensor(case["rates"], dtype=torch.float32, device=gdev)[:, None]
    present = torch.rand(M, B, generator=g, device=gdev) < rates
    present[0] |= ~present.any(0)        # every sample holds at least one modality
    emb = emb.to(device=device, dtype=dtype).requires_grad_(True)
    return emb, present.to(device)


def group_stats(case, present):
    ns = naive.pair_sizes(present.cpu())
    nmax = max(ns) if ns else 0
    flops = naive.useful_flops_contrastive(present.cpu(), case["D"], case["form"])
    return ns, nmax, flops


# ------------------------------------------------------------------ impls
def loss_fn(case, impl, emb, present, sf):
    op = case["op"]
    if impl.startswith("scale_fast"):
        be = case["backend"]
        if op == "scale":
            return lambda: sf.scale_loss(emb, present, logit_scale=LOGIT_SCALE, form=case["form"],
                                         backend=be).total
        return lambda: sf.multi_pair_info_nce(emb, present, logit_scale=LOGIT_SCALE, weights=None,
                                              form="clip", backend=be)[0, 1]
    if impl == "naive":
        if op == "scale":
            return lambda: naive.scale_contrastive(emb, present, logit_scale=LOGIT_SCALE, form=case["form"])
        return lambda: naive.multi_pair_info_nce(emb, present, logit_scale=LOGIT_SCALE, form="clip")[0, 1]
    if impl == "open_clip ClipLoss":
        ClipLoss = import_clip_loss()
        crit = ClipLoss()
        return lambda: crit(F.normalize(emb[0], dim=-1), F.normalize(emb[1], dim=-1), LOGIT_SCALE)
    if impl == "inf_cl cal_inf_loss x2":
        from inf_cl import cal_inf_loss

        def f():
            a, b = F.normalize(emb[0], dim=-1), F.normalize(emb[1], dim=-1)
            # one direction per call (rows q against columns k); the scale multiplies q
            return 0.5 * (cal_inf_loss(LOGIT_SCALE * a, b) + cal_inf_loss(LOGIT_SCALE * b, a))
        return f
    raise ValueError(impl)


def import_clip_loss():
    """open_clip.loss.ClipLoss; when the package's __init__ fails (it imports its whole
    model zoo), the loss module alone is loaded from the installed files."""
    try:
        from open_clip.loss import ClipLoss
        return ClipLoss
    except Exception as exc:  # noqa: BLE001
        import importlib.util
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"open_clip not installed ({type(exc).__name__}: {exc})") from exc
        path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
        s2 = importlib.util.spec_from_file_location("open_clip_loss_only", path)
        mod = importlib.util.module_from_spec(s2)
        s2.loader.exec_module(mod)
        return mod.ClipLoss


PEER_NEEDS_CUDA = {"inf_cl cal_inf_loss x2": "inf_cl"}


def make_step(fn, emb):
    def step():
        emb.grad = None
        loss = fn()
        loss.backward()
        return loss.detach().float(), [emb.grad]

    def clear():
        emb.grad = None
    step.clear = clear
    return step


# ------------------------------------------------------------------ one case
def naive_estimate(case, present, device):
    eb = 4 if case["dtype"] == "float32" else 2
    est = naive.naive_contrastive_bytes(present.cpu(), eb, case["form"])
    free = common.free_device_bytes(device)
    limit = min(CPU_NAIVE_LIMIT, int(0.75 * free)) if device == "cpu" else int(0.85 * free)
    return est, limit


def run_case(case, args, ctx):
    device = args.device
    impl, role = case["impl"], case["role"]
    refpath = ctx["refdir"] / f"ref_{case['group'].replace(' ', '_').replace('=', '')}.pt"
    emb, present = make_inputs(case, device)
    ns, nmax, flops = group_stats(case, present)
    rec = {"n_pairs": len([n for n in ns if n > 0]), "n_max": nmax, "useful_flops": flops}
    budget = args.case_budget_s or (3.0 if device.startswith("cuda") else 25.0)

    if role == "mm":
        D = case["D"]
        m = 2 * nmax if case["form"] == "ntxent" else nmax
        cap = 2 ** 28
        r = common.mm_rate(m, D, m, dtype=emb.dtype, device=device, budget_s=min(budget, 15.0), max_out_elems=cap)
        rec.update(time_ms=r["ms"], reps=r["reps"], mm_gflops=r["gflops"], note=f"torch.mm {r['shape']}")
        return rec

    if role == "ref":
        if refpath.exists():
            return {**rec, "status": "skipped", "reason": "reference already given by the naive float32 row"}
        # independent float32 reference, row-chunked; gradients through checkpointing
        emb32 = emb.detach().float().requires_grad_(True)
        with_grad = device.startswith("cuda") or case["B"] <= 8192
        t0 = time.perf_counter()
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        if device.startswith("cuda"):
            # the inputs are bf16 values, exact in TF32: only the backward GEMMs round (~1e-3)
            torch.backends.cuda.matmul.allow_tf32 = True
        try:
            kw = dict(logit_scale=LOGIT_SCALE, form=case["form"], chunk_rows=4096)
            if case["op"] == "clip":
                kw.update(weights=None, reduce="pair01")
            if with_grad:
                loss = naive.contrastive_chunked(emb32, present, **kw)
                loss.backward()
                grads = [emb32.grad]
            else:
                with torch.no_grad():
                    loss = naive.contrastive_chunked(emb32, present, **kw)
                grads = [None]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        common.sync(device)
        common.save_ref(refpath, loss.item(), grads)
        rec.update(time_ms=(time.perf_counter() - t0) * 1e3, loss=loss.item(),
                   note="float32 row-chunked reference" + ("" if with_grad else ", forward only (no gradient check)"))
        return rec

    # ---- implementation rows
    if impl == "naive":
        est, limit = naive_estimate(case, present, device)
        rec["naive_est_gib"] = round(naive.gib(est), 2)
        if est > limit:
            return {**rec, "status": "skipped",
                    "reason": f"memory estimate {naive.gib(est):.1f} GiB > limit {naive.gib(limit):.1f} GiB"}
    if impl in PEER_NEEDS_CUDA and not device.startswith("cuda"):
        mod = PEER_NEEDS_CUDA[impl]
        try:
            __import__(mod)
            why = "importable, but runs on CUDA tensors only"
        except Exception as exc:  # noqa: BLE001
            why = f"not importable ({type(exc).__name__}: {exc})"
        return {**rec, "status": "skipped", "reason": why}
    sf = None
    if impl.startswith("scale_fast"):
        sf, err = common.try_import_scale_fast()
        if sf is None:
            return {**rec, "status": "skipped", "reason": f"scale_fast not importable: {err}"}
    try:
        fn = loss_fn(case, impl, emb, present, sf)
    except ImportError as exc:
        return {**rec, "status": "skipped", "reason": f"not importable: {exc}"}
    step = make_step(fn, emb)
    warm = None
    if not device.startswith("cuda"):
        we, wp = make_inputs(case, device, B=64)
        warm = make_step(loss_fn(case, impl, we, wp, sf), we)
    m = common.measure_step(step, device=device, budget_s=budget, deadline=args.deadline or time.time() + 1e9,
                            max_reps=15 if case["B"] <= 2048 else 10, warm=warm)
    loss, grads = m["result"]
    rec.update(time_ms=statistics.median(m["times_ms"]), reps=len(m["times_ms"]),
               times_ms=[round(t, 3) for t in m["times_ms"]],
               peak_mib=m["peak_bytes"] / 2 ** 20 if m["peak_bytes"] >= 0 else None,
               loss=float(loss), note=m["note"])
    if role == "impl+ref" and case["dtype"] == "float32":
        common.save_ref(refpath, float(loss), grads)
        rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "is the float32 reference"
    ref = common.load_ref(refpath)
    if ref is not None:
        rec["loss_rel_err"] = common.rel_err(loss, ref["loss"])
        rec["grad_rel_err"] = common.grads_rel_err(grads, ref["grads"]) if ref["grads"][0] is not None else None
    else:
        rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "no reference"
    return rec


# ------------------------------------------------------------------ table
def report(args, records, info, command) -> str:
    cuda = args.device.startswith("cuda")
    unit, div = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    mm = {r["group"]: r.get("mm_gflops") for r in records if r["role"] == "mm" and r.get("status") == "ok"}
    rows = []
    for r in sorted(records, key=lambda r: (r["B"], r["M"], r["idx"])):
        if r["role"] == "ref":
            continue
        row = {"group": r["group"], "M": r["M"], "form": r["form"], "B": r["B"], "impl": r["impl"],
               "time ms": r.get("time_ms") if r.get("status") == "ok" else None,
               "peak extra MiB": r.get("peak_mib") if r.get("status") == "ok" else None,
               "loss rel err": r.get("loss_rel_err"), "grad rel err": r.get("grad_rel_err"),
               "load": r.get("load"), "status": common.status_text(r)}
        if r.get("status") == "ok":
            if r["role"] == "mm":
                row[f"useful {unit}"] = r["mm_gflops"] * 1e9 / div
                row["× torch.mm"] = 1.0
            elif r.get("time_ms"):
                rate = r["useful_flops"] / (r["time_ms"] * 1e-3)
                row[f"useful {unit}"] = rate / div
                if mm.get(r["group"]):
                    row["× torch.mm"] = rate / (mm[r["group"]] * 1e9)
        rows.append(row)
    cols = (["M", "form"] if args.table == "gpu" else []) + ["B", "impl", "time ms", "peak extra MiB", f"useful {unit}",
                                              "× torch.mm", "loss rel err", "grad rel err"]
    cols += ([] if cuda else ["load"]) + ["status"]
    title = ("SCALE contrastive loss fwd+bwd — " + (f"GPU ({info.get('gpu', 'cuda')})" if cuda else "CPU")
             + (" — DRY RUN (tiny sizes, not a measurement)" if args.dry_run else ""))
    text = common.header_markdown(title, info, command) + "\n"
    if args.table == "cpu":
        text += (f"Op: `sf.scale_loss(embeddings[M,B,D], present, logit_scale=1/0.07)` contrastive part "
                 f"(form ntxent, S' weights, sample mode, no masked tasks), M=5, D={records[0]['D']}, float32, "
                 f"present rates {PRESENT_RATES} (text, image, table, video, audio; seed fixed). "
                 "`scale_fast torch` = backend=\"torch\"; `naive` = benchmarks/naive.py (per pair full "
                 "[2n,2n] logits, masked diagonal, F.cross_entropy; S' in plain torch).\n\n")
    else:
        text += ("Ops (bf16 inputs, all modalities present): `clip` = "
                 "`sf.multi_pair_info_nce(form='clip', weights=None)` pair (0,1) vs naive, OpenCLIP ClipLoss "
                 "(normalized features) and Inf-CL (`cal_inf_loss(s·a, b)` and `(s·b, a)` averaged; it casts to "
                 "fp32 and uses TF32); `scale` = `sf.scale_loss` contrastive part, M=5, ntxent with S' weights. "
                 "logit_scale 1/0.07.\n\n")
    text += (f"Time: median of repeats after warm-up ({'CUDA events, L2 flushed' if cuda else 'perf_counter'}). "
             f"Peak extra: {'torch.cuda.max_memory_allocated minus the allocation before one fwd+bwd' if cuda else 'VmHWM growth over VmRSS of one fwd+bwd, one fresh process per row'} "
             "(includes the embedding gradient). Useful FLOPs: ntxent Σ 6(2n)²D, clip Σ 6n²D over active "
             "pairs; `torch.mm` row: same-B (2n×D)@(D×2n) product (clip n×D@D×n; output columns capped "
             "where noted). Rel errs: vs an independent float32 reference (naive float32, or row-chunked "
             "float32 with checkpointing where the naive one does not fit).\n\n")
    text += common.md_table(cols, rows)
    text += "\n## Targets (from the issue)\n\n" + targets_text(args, records, mm) + "\n"
    refs = sorted([r for r in records if r["role"] == "ref"], key=lambda r: (r["B"], r["M"]))
    if refs:
        text += "\n## References\n\n"
        for r in refs:
            text += f"- {r['group']}: {common.status_text(r)}" + (f", loss {r['loss']:.6g}" if r.get("loss") else "") + "\n"
    return text, rows


def _get(records, B, impl_prefix, group_prefix="scale"):
    for r in records:
        if r["B"] == B and r["impl"].startswith(impl_prefix) and r["group"].startswith(group_prefix) \
                and r.get("status") == "ok" and r["role"] != "ref":
            return r
    return None


def targets_text(args, records, mm) -> str:
    lines = []
    sfname = "scale_fast triton" if args.device.startswith("cuda") else "scale_fast torch"
    if args.dry_run:
        sfname = "scale_fast torch"

    def verdict(ok):
        return "PASS" if ok else "FAIL"
    Bt = 4096 if args.table == "cpu" else 16384
    s, n = _get(records, Bt, sfname), _get(records, Bt, "naive")
    if s and n:
        ratio = s["time_ms"] / n["time_ms"]
        lines.append(f"- B={Bt}: {sfname} fwd+bwd time / naive = {s['time_ms']:.1f} / {n['time_ms']:.1f} ms "
                     f"= **{ratio:.2f}×** (target ≤ 0.4×): {verdict(ratio <= 0.4)}")
    else:
        lines.append(f"- B={Bt}: time ratio vs naive not available (a row is missing or failed)")
    for r in sorted(records, key=lambda r: (r["B"], r["M"])):
        if r["impl"].startswith(sfname) and r.get("status") == "ok" and r["role"] == "impl" and r["B"] >= 4096 \
                and r["group"].startswith("scale") and mm.get(r["group"]):
            rate = r["useful_flops"] / (r["time_ms"] * 1e-3) / 1e9
            ratio = rate / mm[r["group"]]
            lines.append(f"- B={r['B']}: useful {rate:,.1f} GFLOP/s vs torch.mm {mm[r['group']]:,.1f} GFLOP/s "
                         f"= **{ratio:.2f}×** (target ≥ 0.7×): {verdict(ratio >= 0.7)}")
    Bm = 16384 if args.table == "cpu" else 65536
    s = _get(records, Bm, sfname)
    if s and s.get("peak_mib") is not None:
        lines.append(f"- B={Bm}: {sfname} peak extra memory **{s['peak_mib']:.1f} MiB** (target < 256 MiB on "
                     f"the CPU table; informational on GPU): {verdict(s['peak_mib'] < 256)}")
    else:
        lines.append(f"- B={Bm}: peak memory of {sfname} not available")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--table", choices=["cpu", "gpu"], default=None,
                   help="which table (default: gpu on CUDA or with --dry-run, else cpu)")
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma-separated batch sizes (default: the table's own list)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    common.resolve_device(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here (use --dry-run to exercise the GPU table on CPU)")
        return 2
    if args.table is None:
        args.table = "gpu" if (args.device.startswith("cuda") or args.dry_run) else "cpu"
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    cases = build_cases(args)
    if args.child_start is not None:
        return common.child_main(args, cases, run_case)
    budget = args.budget_s or (150 if args.dry_run else (170 if args.device.startswith("cuda") else 720))
    cmd = "python benchmarks/bench_contrastive.py " + " ".join(argv)
    print(f"{len(cases)} cases, device {args.device}, table {args.table}, budget {budget:.0f} s", flush=True)
    info = common.machine_info(args.device)
    if args.note:
        info["note"] = args.note
    records = common.drive(os.path.abspath(__file__), argv, args, cases,
                           per_case_process=not (args.device.startswith("cuda") or args.dry_run),
                           budget_s=budget)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text, rows = report(args, records, info, cmd.strip())
    tag = common.device_tag(args.device) + ("_dryrun" if args.dry_run else "")
    out_dir = Path(args.out_dir) if args.out_dir else (Path("/tmp/sf_bench_dryrun") if args.dry_run else None)
    md, cs = common.write_results(NAME, tag, text, [dict(r, **{"info_" + k: v for k, v in info.items()})
                                                    for r in records], out_dir)
    print("\n" + text)
    print(f"written: {md} {cs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
