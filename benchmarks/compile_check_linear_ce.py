"""Compile every Triton kernel of kernels/linear_ce.py for an H100 (sm_90), without a GPU.

The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run) accepts
code that the real compiler rejects (dtype mismatches, tl.dot shapes, pointer
types), so this script runs the full CUDA pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> ptxas -> cubin) for sm_90 on every autotune config, in bf16, fp16 and
fp32 (ieee and tf32), hard and soft targets, with and without bias/scale, and
reports registers, spills, shared memory and whether the dots became Hopper
wgmma.  Prints "OK" at the end when everything compiled.

    python benchmarks/compile_check_linear_ce.py            # must NOT have TRITON_INTERPRET=1
    python benchmarks/compile_check_linear_ce.py --quick    # one config per kernel variant
    PYTHONPATH=/path/to/triton-3.6 python ...                # check against another triton release

With ``--gpu`` (on a machine with a CUDA GPU) it instead checks the kernels
against a float64 reference on small odd shapes and times forward+backward at
the SCALE shape (N=16384, K=21128, H=768, bf16) against plain torch and a
chunked cuBLAS implementation (the Liger-Kernel scheme: materialize a row chunk
of logits, then two GEMMs), with peak memory.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_module():
    """kernels/linear_ce.py as a standalone module (the package may pull in unrelated kernels)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_fast_linear_ce_check", os.path.join(ROOT, "kernels",
                                                                                             "linear_ce.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- #
# sm_90 compile check
# --------------------------------------------------------------------------- #
def _ptxas_info(ptx: str, arch: str):
    """(registers, spill stores, spill loads) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90).path
    except TypeError:  # older triton: get_ptxas() takes no argument
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(spill.group(1)) if spill else -1, int(spill.group(2)) if spill else -1)


def _signature(fn, types: dict, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def _attrs(fn, div16: list):
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}


def _compile_job(job):
    """Compile one (kernel, types, constexprs, config) for sm_90; returns a report line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, label, types, cx, div16, num_warps, num_stages = job
    mod = _load_module()
    fn = mod._lce_fwd_kernel if name == "fwd" else mod._lce_bwd_kernel
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, types, cx), constexprs=cx, attrs=_attrs(fn, div16))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        smem = k.metadata.shared
        regs, sst, sld = _ptxas_info(k.asm["ptx"], "sm_90a")
        wgmma = "warp_group_dot" in k.asm["ttgir"]
        notes = []
        if smem > 227 * 1024:
            notes.append("smem > 227 KiB: autotune skips it")
        if sst > 0:
            notes.append("SPILLS")
        return True, (f"ok   {label}  smem={smem // 1024}KiB regs={regs} spill={sst}/{sld} "
                      f"wgmma={'yes' if wgmma else 'no'} ({time.time() - t0:.0f}s)"
                      + (f"  [{'; '.join(notes)}]" if notes else ""))
    except Exception as exc:  # report every failure, then fail
        msg = str(exc).strip().splitlines()
        return False, f"FAIL {label}: {type(exc).__name__}: {' | '.join(msg[:8])}"


def compile_check(quick: bool, jobs_n: int) -> int:
    import triton

    mod = _load_module()
    assert not mod._INTERPRET, "unset TRITON_INTERPRET: the check compiles the CUDA configs"
    print(f"triton {triton.__version__}: compiling kernels/linear_ce.py for sm_90", flush=True)

    # (hidden/weight dtype, precision, target kind, bias dtype, bias, scale, H divisible by 16 (as the
    # JIT specializes it: H=768 yes, H=33 no; K, the soft-target row stride, is taken as odd), every config)
    variants = [
        ("bf16", "ieee", "hard", "bf16", True, True, True, True),
        ("bf16", "ieee", "hard", "fp32", False, False, True, False),
        ("bf16", "ieee", "hard", "bf16", True, True, False, False),
        ("bf16", "ieee", "soft", "bf16", True, True, True, True),
        ("bf16", "ieee", "soft", "fp32", False, False, False, False),
        ("fp16", "ieee", "hard", "fp16", True, False, True, False),
        ("fp32", "ieee", "hard", "fp32", True, True, True, True),
        ("fp32", "ieee", "hard", "fp32", False, True, False, False),
        ("fp32", "ieee", "soft", "fp32", True, True, True, False),
        ("fp32", "tf32", "soft", "fp32", False, True, True, True),
        ("fp32", "tf32", "hard", "fp32", True, True, True, True),
    ]
    jobs = []
    for dt, prec, kind, bdt, has_b, has_s, div, every in variants:
        soft = kind == "soft"
        cls = ("soft16" if soft else "mma16") if dt != "fp32" else prec
        tdt = ("*bf16" if dt == "bf16" else "*fp32") if soft else "*i64"
        common_types = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{bdt}", s_ptr="*fp32", t_ptr=tdt,
                            N="i32", K="i32", H="i32", ignore_index="i32", stride_hn="i32", stride_wk="i32",
                            stride_tn="i32", N_BUCKET="i32")
        ptr_names = ["h_ptr", "w_ptr", "b_ptr", "s_ptr", "t_ptr"]
        hdiv = ["H", "stride_hn", "stride_wk"] if div else []
        flags = dict(HAS_BIAS=has_b, HAS_SCALE=has_s, SOFT=soft, PRECISION=prec, DOT_F32=False)
        head = (f"{dt:4s} {prec:4s} {kind:4s} bias={int(has_b)} scale={int(has_s)} div16={int(div)}")
        fwd_cfgs = mod._FWD_SETS[cls] if (every and not quick) else mod._FWD_SETS[cls][:1]
        bwd_cfgs = mod._BWD_SETS[cls] if (every and not quick) else mod._BWD_SETS[cls][:1]
        ftypes = dict(common_types, m_ptr="*fp32", l_ptr="*fp32", a_ptr="*fp32", q_ptr="*fp32", CHUNK="i32")
        for cfg in fwd_cfgs:
            cx = dict(flags, **cfg.kwargs)
            div16 = ptr_names + ["m_ptr", "l_ptr", "a_ptr", "q_ptr", "CHUNK"] + hdiv
            label = (f"fwd {head} BN={cx['BLOCK_N']} BK={cx['BLOCK_K']} BH={cx['BLOCK_H']} "
                     f"w={cfg.num_warps} s={cfg.num_stages}")
            jobs.append(("fwd", label, ftypes, cx, div16, cfg.num_warps, cfg.num_stages))
        btypes = dict(common_types, lse_ptr="*fp32", qs_ptr="*fp32", c_ptr="*fp32", dh_ptr="*fp32",
                      dw_ptr="*fp32", db_ptr="*fp32", ds_ptr="*fp32", dt_ptr=tdt, stride_dtn="i32",
                      g_ptr=f"*{dt}", stride_gn="i32")
        base = dict(NEED_DB=has_b, NEED_DS=has_s, NEED_DT=soft, STORE_G=False, ATOMIC=True)
        needs = [dict(base, NEED_DH=True, NEED_DW=True),
                 dict(base, NEED_DH=False, NEED_DW=False, STORE_G=True)]  # chunked backward
        if every and kind == "hard":  # frozen head (dH only) and frozen encoder (dW only)
            needs.append(dict(base, NEED_DH=True, NEED_DW=False, NEED_DB=False, NEED_DS=False))
            needs.append(dict(base, NEED_DH=False, NEED_DW=True, NEED_DS=False))
        for i, need in enumerate(needs):
            for cfg in (bwd_cfgs if i == 0 else bwd_cfgs[:1]):
                cx = dict(flags, **need, **cfg.kwargs)
                div16 = ptr_names + ["lse_ptr", "qs_ptr", "c_ptr", "dh_ptr", "dw_ptr", "db_ptr", "ds_ptr",
                                     "dt_ptr", "g_ptr"] + hdiv
                label = (f"bwd {head} BN={cx['BLOCK_N']} BK={cx['BLOCK_K']} BH={cx['BLOCK_H']} "
                         f"BHP={cx['BLOCK_HP']} w={cfg.num_warps} s={cfg.num_stages} dH={int(need['NEED_DH'])} "
                         f"dW={int(need['NEED_DW'])} storeG={int(need['STORE_G'])}")
                jobs.append(("bwd", label, btypes, cx, div16, cfg.num_warps, cfg.num_stages))

    t0 = time.time()
    failures = 0
    if jobs_n > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs_n) as pool:
            results = pool.imap(_compile_job, jobs)
            for ok, line in results:
                failures += not ok
                print(line, flush=True)
    else:
        for job in jobs:
            ok, line = _compile_job(job)
            failures += not ok
            print(line, flush=True)
    print(f"{len(jobs) - failures} compiled, {failures} failed in {time.time() - t0:.0f}s")
    if failures:
        print("FAILED")
        return 1
    print("OK")
    return 0


# --------------------------------------------------------------------------- #
# GPU check and benchmark (--gpu)
# --------------------------------------------------------------------------- #
def _ref(h, w, t, b, s, ig, red):
    import torch

    logits = h @ w.T
    if b is not None:
        logits = logits + b
    if s is not None:
        logits = s[:, None] * logits
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    if t.is_floating_point():
        per, cnt = -(t * logp).sum(-1), h.shape[0]
    else:
        keep = t != ig
        st = torch.where(keep, t, torch.zeros_like(t))
        per = torch.where(keep, -logp.gather(1, st[:, None])[:, 0], torch.zeros_like(logp[:, 0]))
        cnt = int(keep.sum())
    if red == "none":
        return per
    if red == "sum":
        return per.sum()
    return per.sum() / cnt if cnt else per.sum() * 0.0


def gpu_check(mod) -> int:
    """Kernels (one config each) against float64 torch on small odd shapes, on the GPU."""
    import torch

    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    fails = 0
    cases = 0
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    # (target kind, reduction, bias+scale, ignored fraction)
    kinds = [("hard", "mean", True, 0.3), ("soft", "sum", True, 0.0), ("hard", "none", False, 0.3),
             ("hard", "mean", False, 1.0), ("soft", "mean", False, 0.0)]
    full = [(5, 33, 67, (0, 1, 2, 3, 4)), (300, 64, 4099, (0, 1, 2, 3, 4)), (129, 768, 1000, (0, 1)),
            (1, 16, 3, (0, 1))]
    runs = [(torch.float32, "0", full), (torch.bfloat16, "0", full),
            (torch.float32, "1", [(300, 64, 4099, (0, 1)), (129, 768, 1000, (0,))])]
    for dtype, tf32, shapes in runs:
        os.environ["SCALE_FAST_TF32"] = tf32
        for (N, H, K, which) in shapes:
            for kind, red, bs, frac in [kinds[i] for i in which]:
                soft = kind == "soft"
                h = torch.randn(N, H, generator=gen, dtype=torch.float64)
                w = torch.randn(K, H, generator=gen, dtype=torch.float64) / H ** 0.5
                b = torch.randn(K, generator=gen, dtype=torch.float64) if bs else None
                s = torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 0.5 if bs else None
                if soft:
                    t = torch.softmax(2 * torch.randn(N, K, generator=gen, dtype=torch.float64), -1)
                else:
                    t = torch.randint(0, K, (N,), generator=gen)
                    t[torch.rand(N, generator=gen) < frac] = -100
                xs64 = [x.clone().requires_grad_() if x is not None and x.is_floating_point() else x
                        for x in (h, w, b, s, t)]
                xsd = [x.detach().to(dev, dtype).requires_grad_() if x is not None and x.is_floating_point()
                       else (x.to(dev) if x is not None else None) for x in (h, w, b, s, t)]
                want = _ref(xs64[0], xs64[1], xs64[4], xs64[2], xs64[3], -100, red)
                out = mod.linear_cross_entropy(xsd[0], xsd[1], xsd[4], xsd[2], xsd[3], -100, red)
                G = torch.randn(want.shape, generator=gen, dtype=torch.float64)
                idx = [i for i, x in enumerate(xs64) if x is not None and x.requires_grad]
                gr = torch.autograd.grad((want * G).sum(), [xs64[i] for i in idx], allow_unused=True)
                gl = torch.autograd.grad((out * G.to(dev, out.dtype)).sum(), [xsd[i] for i in idx],
                                         allow_unused=True)
                if dtype == torch.float32 and tf32 == "0":
                    tv, tg = 1e-5, 1e-4
                elif dtype == torch.float32:
                    tv, tg = 2e-3, 2e-3
                else:
                    tv, tg = 2e-2, 2e-2
                ref_v = want.detach()
                errs = [float((out.double().cpu() - ref_v).abs().max()) / max(float(ref_v.abs().max()), 1e-2)]
                for a, r in zip(gl, gr):
                    a = a.double().cpu()
                    rn = float(r.norm()) if r is not None else 0.0
                    errs.append(float((a - r).norm()) / rn if rn > 0 else float(a.abs().max()))
                ok = (errs[0] <= tv and all(e <= tg for e in errs[1:]) and bool(torch.isfinite(out).all())
                      and out.dtype == torch.float32)
                cases += 1
                if not ok:
                    fails += 1
                    print(f"FAIL {dtype} tf32={tf32} N={N} H={H} K={K} {kind} {red} bias/scale={bs} "
                          f"errs={['%.2e' % e for e in errs]}", flush=True)
    os.environ["SCALE_FAST_TF32"] = "0"
    print(f"gpu correctness: {cases - fails}/{cases} ok ({time.time() - t0:.0f}s)", flush=True)
    return fails


def _chunked_cublas(h, w, t, chunk=1024):
    """Liger-Kernel's scheme in plain torch (a proxy: Liger fuses the softmax part in one Triton kernel):
    per row chunk, logits by cuBLAS, softmax gradient, dH and dW by cuBLAS; grads formed in forward."""
    import torch

    N = h.shape[0]
    dh = torch.empty_like(h)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    cnt = (t != -100).sum().clamp(min=1)
    for i in range(0, N, chunk):
        hc, tc = h[i:i + chunk], t[i:i + chunk]
        logits = (hc @ w.T).float()
        lse = torch.logsumexp(logits, -1)
        valid = tc != -100
        st = torch.where(valid, tc, 0)
        loss += ((lse - logits.gather(1, st[:, None])[:, 0]) * valid).sum()
        g = logits.sub_(lse[:, None]).exp_()
        g.scatter_add_(1, st[:, None], -valid.float()[:, None])
        g = (g * (valid.float() / cnt)[:, None]).to(h.dtype)
        dh[i:i + chunk] = g @ w
        dw += (g.T @ hc).float()
    return loss / cnt, dh, dw.to(w.dtype)


def gpu_bench(mod):
    import torch
    import triton

    dev = "cuda"
    N, K, H = 16384, 21128, 768
    print(f"\n=== benchmark N={N} K={K} H={H} bf16, hard targets, 10% ignored, no bias/scale ===", flush=True)
    torch.manual_seed(0)
    h = (torch.randn(N, H, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(K, H, device=dev) / H ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, K, (N,), device=dev)
    t[torch.rand(N, device=dev) < 0.1] = -100
    flops = 2 * N * K * H

    def ours_fb():
        loss = mod.linear_cross_entropy(h, w, t, None, None, -100, "mean")
        gh, gw = torch.autograd.grad(loss, [h, w])
        return loss, gh, gw

    def ours_f():
        with torch.no_grad():
            return mod.linear_cross_entropy(h, w, t, None, None, -100, "mean")

    def torch_fb():
        loss = torch.nn.functional.cross_entropy((h @ w.T).float(), t, ignore_index=-100)
        gh, gw = torch.autograd.grad(loss, [h, w])
        return loss, gh, gw

    def chunked():
        with torch.no_grad():
            return _chunked_cublas(h.detach(), w.detach(), t)

    def gemm():
        with torch.no_grad():
            return h @ w.T

    t0 = time.time()
    l1, gh1, gw1 = ours_fb()
    torch.cuda.synchronize()
    print(f"first call (autotune + compile): {time.time() - t0:.1f}s", flush=True)
    l2, gh2, gw2 = torch_fb()
    l3, gh3, gw3 = chunked()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    print(f"ours vs torch (bf16 logits): loss {float(l1):.6f} vs {float(l2):.6f}; dH rel {rel(gh1, gh2):.2e}; "
          f"dW rel {rel(gw1, gw2):.2e}; chunked: loss {float(l3):.6f} dH rel {rel(gh3, gh2):.2e} "
          f"dW rel {rel(gw3, gw2):.2e}", flush=True)
    best_f, best_b = mod._lce_fwd.best_config, mod._lce_bwd.best_config
    print(f"  autotuned fwd: {best_f}\n  autotuned bwd: {best_b}", flush=True)
    del l2, gh2, gw2, l3, gh3, gw3
    def with_env(fn, **env):
        def run():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return fn()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return run

    for mb in ("128", "512"):
        l4, gh4, gw4 = with_env(ours_fb, SCALE_FAST_LCE_BACKWARD="chunked", SCALE_FAST_LCE_CHUNK_MB=mb)()
        print(f"ours chunked backward ({mb} MiB): loss {float(l4):.6f}; dH rel {rel(gh4, gh1):.2e}; "
              f"dW rel {rel(gw4, gw1):.2e} (vs ours fused)", flush=True)
    benches = [("cuBLAS h @ w.T alone (1 GEMM)", gemm, 1), ("ours fwd (no grad)", ours_f, 1),
               ("ours fwd+bwd, fused atomic backward", with_env(ours_fb, SCALE_FAST_LCE_BACKWARD="fused"), 4)]
    for mb in ("64", "128", "256", "512", "1024"):
        benches.append((f"ours fwd+bwd, chunked backward {mb} MiB",
                        with_env(ours_fb, SCALE_FAST_LCE_BACKWARD="chunked", SCALE_FAST_LCE_CHUNK_MB=mb), 4))
    benches += [("torch materialized fwd+bwd", torch_fb, 3), ("chunked cuBLAS (Liger scheme) fwd+bwd", chunked, 3)]
    for name, fn, n_gemm in benches:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = triton.testing.do_bench(fn, warmup=5, rep=50)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        print(f"{name:46s} {ms:8.3f} ms  {n_gemm * flops / ms / 1e9:5.0f} TFLOP/s  peak extra {peak:7.0f} MiB",
              flush=True)

    # backward kernel alone: every config, and what each part costs with the best config
    hd, wd = h.detach(), w.detach()
    lse = torch.logsumexp((hd @ wd.T).float(), -1)
    valid = t != -100
    c = (valid.float() / valid.sum().clamp(min=1)).contiguous()
    dh = torch.zeros(N, H, device=dev)
    dw = torch.zeros(K, H, device=dev)
    dummy = torch.zeros(1, device=dev)

    def bwd(cfg, need_dh=True, need_dw=True, atomic=True):
        grid = (triton.cdiv(N, cfg.kwargs["BLOCK_N"]) * triton.cdiv(K, cfg.kwargs["BLOCK_K"]),)
        return lambda: mod._lce_bwd_kernel[grid](
            hd, wd, dummy, dummy, t, lse, dummy, c, dh, dw, dummy, dummy, dummy, dummy,
            N, K, H, -100, H, H, 1, 1, 1, mod._n_bucket(N),
            HAS_BIAS=False, HAS_SCALE=False, SOFT=False, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=False,
            NEED_DS=False, NEED_DT=False, STORE_G=False, PRECISION="ieee", DOT_F32=False, ATOMIC=atomic,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)

    print("backward kernel alone (3 GEMMs: recompute, dH, dW):", flush=True)
    for cfg in mod._BWD_SETS.get("mma16", mod._BWD_SETS.get("all")):
        ms = triton.testing.do_bench(bwd(cfg), warmup=3, rep=30)
        print(f"  {str(cfg)[:80]:80s} {ms:7.3f} ms {3 * flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
    for label, kw, n_gemm in (("recompute + dH (atomics)", dict(need_dw=False), 2),
                              ("recompute + dW (atomics)", dict(need_dh=False), 2),
                              ("recompute + dH + dW, plain stores (WRONG, timing only)", dict(atomic=False), 3)):
        ms = triton.testing.do_bench(bwd(best_b, **kw), warmup=3, rep=30)
        print(f"  best cfg, {label:55s} {ms:7.3f} ms {n_gemm * flops / ms / 1e9:5.0f} TFLOP/s", flush=True)

    print("forward kernel configs:", flush=True)
    split, chunk = mod._vocab_split(N, K, hd.device)
    m_part = torch.empty(split, N, device=dev)
    for cfg in mod._FWD_SETS.get("mma16", mod._FWD_SETS.get("all")):
        grid = (triton.cdiv(N, cfg.kwargs["BLOCK_N"]), split)
        fn = lambda cfg=cfg, grid=grid: mod._lce_fwd_kernel[grid](  # noqa: E731
            hd, wd, dummy, dummy, t, m_part, m_part, m_part, dummy, N, K, H, chunk, -100, H, H, 1,
            mod._n_bucket(N), HAS_BIAS=False, HAS_SCALE=False, SOFT=False, PRECISION="ieee", DOT_F32=False,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
        ms = triton.testing.do_bench(fn, warmup=3, rep=30)
        print(f"  split={split} {str(cfg)[:80]:80s} {ms:7.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.gpu:
        import torch
        import triton

        print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}",
              flush=True)
        os.environ["SCALE_FAST_LCE_AUTOTUNE"] = "0"  # correctness: one config per set, no tuning per shape
        fixed = _load_module()
        os.environ.pop("SCALE_FAST_LCE_AUTOTUNE")
        fails = gpu_check(fixed)
        os.environ.update(SCALE_FAST_LCE_BACKWARD="chunked", SCALE_FAST_LCE_CHUNK_MB="0.5")
        print("chunked backward (several chunks per call):", flush=True)
        fails += gpu_check(fixed)
        os.environ.pop("SCALE_FAST_LCE_BACKWARD")
        os.environ.pop("SCALE_FAST_LCE_CHUNK_MB")
        if not args.no_bench:
            gpu_bench(_load_module())
        print("OK" if not fails else "FAILED")
        return 1 if fails else 0
    return compile_check(args.quick, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
