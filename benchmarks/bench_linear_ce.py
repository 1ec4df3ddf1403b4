"""Benchmark of the fused linear cross-entropy (fwd+bwd): scale_fast vs PyTorch and peers.

CPU table (default without CUDA): N=8192 rows, K=21128 classes, H=768, float32:
``sf.linear_cross_entropy(backend="torch")`` and ``backend="cpp"`` vs ``torch.nn.functional.linear_cross_entropy``
(torch >= 2.13) in both of its modes -- ``options=None`` (its reference path: linear then
cross_entropy) and ``options=torch.nn.LinearCrossEntropyOptions()`` (its chunked path; for
float32 on CPU "auto" resolves to acc_policy "compact", chunking "aspect_ratio:2") -- and
plain ``F.linear`` + ``F.cross_entropy``.  Target: scale_fast no slower than
F.linear_cross_entropy, with no more memory.

GPU table (``--device cuda``): N=16384, K=21128, H=768, bf16: backend="triton" (d weight accumulated
in float32, and in bf16 with SCALE_FAST_LCE_WEIGHT_GRAD=input) vs linear+CE,
Liger-Kernel's fused linear cross-entropy, Cut Cross-Entropy, F.linear_cross_entropy (if the
torch there has it), backend="torch".

Every result is checked against a float32 linear + cross-entropy reference (loss, and the
gradients of hidden and weight) before it is timed.  Useful FLOPs: 6 N K H (one GEMM forward,
two backward); the torch.mm row is (N x H) @ (H x K) in the same run.

    python benchmarks/bench_linear_ce.py                 # CPU table (~4-5 min on 2 cores)
    python benchmarks/bench_linear_ce.py --device cuda   # GPU table
    python benchmarks/bench_linear_ce.py --dry-run       # GPU-table code paths, tiny, on CPU
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

NAME = "linear_ce"
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

PLAIN = "F.linear + F.cross_entropy"
TLCE_REF = "F.linear_cross_entropy (options=None)"
TLCE_CHUNK = "F.linear_cross_entropy (chunked options)"
LIGER = "liger fused_linear_cross_entropy"
CCE = "cut_cross_entropy"


def build_cases(args) -> list[dict]:
    only = set(args.only.split(",")) if args.only else None
    cases = []

    def add(**kw):
        if only and kw["impl"] not in only and kw["role"] != "ref":
            return
        cases.append(kw)

    if args.table == "cpu":
        N, K, H = (256, 1000, 64) if args.dry_run else (8192, 21128, 768)
        g = dict(group=f"N={N} K={K} H={H}", N=N, K=K, H=H, dtype="float32")
        add(**g, impl=PLAIN, role="impl+ref")
        add(**g, impl=TLCE_REF, role="impl")
        add(**g, impl=TLCE_CHUNK, role="impl")
        add(**g, impl="scale_fast torch", backend="torch", role="impl")
        add(**g, impl="scale_fast cpp", backend="cpp", role="impl")
        add(**g, impl="torch.mm", role="mm")
    else:
        N, K, H = (256, 1000, 64) if args.dry_run else (16384, 21128, 768)
        g = dict(group=f"N={N} K={K} H={H}", N=N, K=K, H=H, dtype="bfloat16")
        tri = "torch" if args.dry_run else "triton"
        add(**g, impl="ref", role="ref")
        add(**g, impl=f"scale_fast {'triton' if not args.dry_run else 'torch (triton in dry run)'}",
            backend=tri, role="impl")
        add(**g, impl=f"scale_fast {tri} (d weight in bf16)", backend=tri, role="impl", weight_grad="input")
        add(**g, impl=PLAIN, role="impl")
        add(**g, impl=LIGER, role="impl")
        add(**g, impl=CCE, role="impl")
        add(**g, impl=TLCE_CHUNK, role="impl")
        add(**g, impl="torch.mm", role="mm")
        if not args.dry_run:
            add(**g, impl="scale_fast torch", backend="torch", role="impl")
    return cases


def make_inputs(case, device, N=None, K=None):
    N, K, H = N or case["N"], K or case["K"], case["H"]
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator(device="cpu").manual_seed(4321)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(K, H, generator=g) * H ** -0.5
    target = torch.randint(0, K, (N,), generator=g)
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(True)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(True)
    return hidden, weight, target.to(device)


def loss_fn(case, impl, hidden, weight, target, sf):
    if impl.startswith("scale_fast"):
        be, wg = case["backend"], case.get("weight_grad", "fp32")

        def run():
            prev = os.environ.get("SCALE_FAST_LCE_WEIGHT_GRAD")
            os.environ["SCALE_FAST_LCE_WEIGHT_GRAD"] = wg
            try:
                return sf.linear_cross_entropy(hidden, weight, target, backend=be)
            finally:
                if prev is None:
                    os.environ.pop("SCALE_FAST_LCE_WEIGHT_GRAD")
                else:
                    os.environ["SCALE_FAST_LCE_WEIGHT_GRAD"] = prev
        return run
    if impl == PLAIN:
        return lambda: naive.linear_cross_entropy(hidden, weight, target)
    if impl in (TLCE_REF, TLCE_CHUNK):
        if not HAS_TORCH_LCE:
            raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy / LinearCrossEntropyOptions")
        opts = None if impl == TLCE_REF else torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(hidden, weight, target, options=opts)
    if impl == LIGER:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lflce
        except Exception:  # noqa: BLE001
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as Fn

            def lflce(x, w, t):
                return Fn.apply(x, w, t)[0]
        return lambda: lflce(hidden, weight, target)
    if impl == CCE:
        from cut_cross_entropy import linear_cross_entropy as cce
        return lambda: cce(hidden, weight, target)
    raise ValueError(impl)


PEER_NEEDS_CUDA = {LIGER: "liger_kernel", CCE: "cut_cross_entropy"}


def make_step(fn, hidden, weight):
    def step():
        hidden.grad = None
        weight.grad = None
        loss = fn()
        loss.backward()
        return loss.detach().float(), [hidden.grad, weight.grad]

    def clear():
        hidden.grad = None
        weight.grad = None
    step.clear = clear
    return step


def run_case(case, args, ctx):
    device = args.device
    impl, role = case["impl"], case["role"]
    N, K, H = case["N"], case["K"], case["H"]
    refpath = ctx["refdir"] / "ref_linear_ce.pt"
    rec = {"useful_flops": 6.0 * N * K * H}
    budget = args.case_budget_s or (3.0 if device.startswith("cuda") else 25.0)
    if role == "mm":
        dtype = getattr(torch, case["dtype"])
        r = common.mm_rate(N, H, K, dtype=dtype, device=device, budget_s=min(budget, 15.0))
        rec.update(time_ms=r["ms"], reps=r["reps"], mm_gflops=r["gflops"], note=f"torch.mm {r['shape']}")
        return rec
    hidden, weight, target = make_inputs(case, device)
    if role == "ref":
        h32 = hidden.detach().float().requires_grad_(True)
        w32 = weight.detach().float().requires_grad_(True)
        t0 = time.perf_counter()
        loss = naive.linear_cross_entropy(h32, w32, target)
        loss.backward()
        common.sync(device)
        common.save_ref(refpath, loss.item(), [h32.grad, w32.grad])
        rec.update(time_ms=(time.perf_counter() - t0) * 1e3, loss=loss.item(),
                   note="float32 F.linear + F.cross_entropy reference")
        return rec
    if impl in PEER_NEEDS_CUDA and not device.startswith("cuda"):
        try:
            __import__(PEER_NEEDS_CUDA[impl])
            why = "importable, but runs on CUDA tensors only"
        except Exception as exc:  # noqa: BLE001
            why = f"not importable ({type(exc).__name__}: {exc})"
        return {**rec, "status": "skipped", "reason": why}
    if impl == PLAIN:
        est = naive.naive_linear_ce_bytes(N, K, 4 if case["dtype"] == "float32" else 2)
        free = common.free_device_bytes(device)
        if est > 0.85 * free:
            return {**rec, "status": "skipped", "reason": f"memory estimate {naive.gib(est):.1f} GiB > free"}
    sf = None
    if impl.startswith("scale_fast"):
        sf, err = common.try_import_scale_fast()
        if sf is None:
            return {**rec, "status": "skipped", "reason": f"scale_fast not importable: {err}"}
    try:
        fn = loss_fn(case, impl, hidden, weight, target, sf)
    except ImportError as exc:
        return {**rec, "status": "skipped", "reason": f"not importable: {exc}"}
    step = make_step(fn, hidden, weight)
    warm = None
    if not device.startswith("cuda"):
        wh, ww, wt = make_inputs(case, device, N=64, K=min(K, 1000))
        warm = make_step(loss_fn(case, impl, wh, ww, wt, sf), wh, ww)
    m = common.measure_step(step, device=device, budget_s=budget, deadline=args.deadline or time.time() + 1e9,
                            max_reps=10, warm=warm)
    loss, grads = m["result"]
    rec.update(time_ms=statistics.median(m["times_ms"]), reps=len(m["times_ms"]),
               times_ms=[round(t, 3) for t in m["times_ms"]],
               peak_mib=m["peak_bytes"] / 2 ** 20 if m["peak_bytes"] >= 0 else None,
               loss=float(loss), note=m["note"])
    if role == "impl+ref":
        common.save_ref(refpath, float(loss), grads)
        rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "is the float32 reference"
    ref = common.load_ref(refpath)
    if ref is not None:
        rec["loss_rel_err"] = common.rel_err(loss, ref["loss"])
        rec["grad_rel_err"] = common.grads_rel_err(grads, ref["grads"])
    return rec


def report(args, records, info, command):
    cuda = args.device.startswith("cuda")
    unit, div = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    mm = next((r.get("mm_gflops") for r in records if r["role"] == "mm" and r.get("status") == "ok"), None)
    rows = []
    for r in records:
        if r["role"] == "ref":
            continue
        ok = r.get("status") == "ok"
        row = {"impl": r["impl"], "time ms": r.get("time_ms") if ok else None,
               "peak extra MiB": r.get("peak_mib") if ok else None,
               "loss rel err": r.get("loss_rel_err"), "grad rel err": r.get("grad_rel_err"),
               "load": r.get("load"), "status": common.status_text(r)}
        if ok and r.get("time_ms"):
            if r["role"] == "mm":
                row[f"useful {unit}"], row["× torch.mm"] = r["mm_gflops"] * 1e9 / div, 1.0
            else:
                rate = r["useful_flops"] / (r["time_ms"] * 1e-3)
                row[f"useful {unit}"] = rate / div
                if mm:
                    row["× torch.mm"] = rate / (mm * 1e9)
        rows.append(row)
    c0 = records[0]
    cols = ["impl", "time ms", "peak extra MiB", f"useful {unit}", "× torch.mm", "loss rel err", "grad rel err"]
    cols += ([] if cuda else ["load"]) + ["status"]
    title = ("Fused linear cross-entropy fwd+bwd — " + (f"GPU ({info.get('gpu', 'cuda')})" if cuda else "CPU")
             + (" — DRY RUN (tiny sizes, not a measurement)" if args.dry_run else ""))
    text = common.header_markdown(title, info, command) + "\n"
    text += (f"N={c0['N']} rows, K={c0['K']} classes, H={c0['H']}, {c0['dtype']}, no bias, no ignored rows, "
             "reduction mean; gradients of hidden and weight. ")
    if args.table == "cpu":
        text += ("`F.linear_cross_entropy (chunked options)` = `options=torch.nn.LinearCrossEntropyOptions()` "
                 "(its chunked path, which precomputes the gradients in forward; for float32 on CPU \"auto\" "
                 "resolves to acc_policy \"compact\", chunking \"aspect_ratio:2\"); `options=None` is its "
                 "reference path (linear then cross_entropy). ")
    else:
        text += ("Liger: `liger_fused_linear_cross_entropy` defaults; CCE: `linear_cross_entropy(e, c, targets)` "
                 "defaults (impl cce, filter_eps 'high': it skips gradient tiles below bf16 eps). ")
    text += (f"Time: median of repeats after warm-up ({'CUDA events, L2 flushed' if cuda else 'perf_counter'}); "
             f"peak extra: {'max_memory_allocated minus the allocation before one fwd+bwd' if cuda else 'VmHWM growth over VmRSS of one fwd+bwd in a fresh process'} "
             "(includes the gradients of hidden and weight). Rel errs vs float32 linear + cross-entropy.\n\n")
    text += common.md_table(cols, rows)
    text += "\n## Targets (from the issue)\n\n" + targets_text(args, records) + "\n"
    return text


def targets_text(args, records):
    def get(prefix):
        return next((r for r in records if r["impl"].startswith(prefix) and r.get("status") == "ok"
                     and r["role"] != "ref"), None)
    sfname = "scale_fast triton" if args.device.startswith("cuda") else "scale_fast torch"
    s = get(sfname)
    lines = []
    for peer in (TLCE_CHUNK, TLCE_REF, LIGER, CCE, PLAIN):
        p = get(peer)
        if not p or not s:
            if not p and args.table == "cpu" and peer in (TLCE_CHUNK, TLCE_REF):
                lines.append(f"- vs {peer}: not available")
            continue
        tr = s["time_ms"] / p["time_ms"]
        line = f"- vs {peer}: time {s['time_ms']:.1f} / {p['time_ms']:.1f} ms = **{tr:.2f}×**"
        if s.get("peak_mib") is not None and p.get("peak_mib") is not None:
            line += f", peak extra {s['peak_mib']:.1f} / {p['peak_mib']:.1f} MiB"
        if peer in (TLCE_CHUNK, TLCE_REF):
            ok = tr <= 1.0 and (s.get("peak_mib") or 0) <= (p.get("peak_mib") or 0)
            line += f" (target: time ≤ 1×, memory ≤ peer's): {'PASS' if ok else 'FAIL'}"
        lines.append(line)
    if not s:
        lines.append(f"- {sfname}: no result")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--table", choices=["cpu", "gpu"], default=None)
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
    budget = args.budget_s or (120 if args.dry_run else (90 if args.device.startswith("cuda") else 360))
    print(f"{len(cases)} cases, device {args.device}, table {args.table}, budget {budget:.0f} s", flush=True)
    info = common.machine_info(args.device)
    if args.note:
        info["note"] = args.note
    records = common.drive(os.path.abspath(__file__), argv, args, cases,
                           per_case_process=not (args.device.startswith("cuda") or args.dry_run), budget_s=budget)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(args, records, info, ("python benchmarks/bench_linear_ce.py " + " ".join(argv)).strip())
    tag = common.device_tag(args.device) + ("_dryrun" if args.dry_run else "")
    out_dir = Path(args.out_dir) if args.out_dir else (Path("/tmp/sf_bench_dryrun") if args.dry_run else None)
    md, cs = common.write_results(NAME, tag, text, [dict(r, **{"info_" + k: v for k, v in info.items()})
                                                    for r in records], out_dir)
    print("\n" + text)
    print(f"written: {md} {cs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
