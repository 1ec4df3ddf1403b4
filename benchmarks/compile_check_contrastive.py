"""Compile every scores/contrastive Triton kernel for an H100 (sm_90) without a GPU.

    python benchmarks/compile_check_contrastive.py [--quick]

Runs ahead-of-time compilation (Triton front end, TTGIR passes, LLVM and ptxas) with
representative constexprs for bf16, fp16 and fp32 pointers, every autotune config of
the contrastive kernels, and with and without 16-divisibility hints (odd D).  The
interpreter accepts things the compiler rejects, so this is the check that the
kernels build for the real target.  Prints OK at the end; exits 1 on any failure.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles for the GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    try:
        return importlib.import_module(f"scale_fast.backends.triton.{name}")
    except ImportError:
        path = os.path.join(ROOT, "kernels", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"_cc_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


TARGET = GPUTarget("cuda", 90, 32)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _jit(kernel):
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):  # unwrap triton.autotune / triton.heuristics
        kernel = kernel.fn
    return kernel


def compile_one(kernel, types: dict, constexprs: dict, num_warps=4, num_stages=2, hints=True):
    fn = _jit(kernel)
    if hasattr(fn, "create_binder"):
        try:
            fn.create_binder()
        except Exception:  # noqa: BLE001  (not needed on every triton version)
            pass
    signature = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            ty = types[name]
            signature[name] = ty
            if hints and (ty.startswith("*") or ty == "i32") and name not in ("B", "M", "RCAP"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    backend = triton.compiler.make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=TARGET, options=options.__dict__)


def contrastive_jobs(con, quick):
    """Every autotune config that the kernels can pick (after pruning) for bf16, fp16,
    fp32-ieee and fp32-tf32, for ntxent (NSEG=2), clip (NSEG=1) and nce (one direction)."""
    jobs = []
    allcfg = list(con._contrastive_fwd_kernel.configs)
    fwd_types = dict(
        pres_ptr="*u8", w_ptr="*fp32", pi_ptr="*i32", pj_ptr="*i32",
        scale_ptr="*fp32", part_ptr="*fp32", pos2_ptr="*fp32",
        B="i32", D="i32", stride_zm="i32", stride_zb="i32", stride_pm="i32", RCAP="i32")
    bwd_types = dict(
        pres_ptr="*u8", w_ptr="*fp32", pi_ptr="*i32", pj_ptr="*i32",
        scale_ptr="*fp32", coef_ptr="*fp32", lse_ptr="*fp32",
        dz_ptr="*fp32", dw_ptr="*fp32", ds_ptr="*fp32",
        B="i32", D="i32", stride_zm="i32", stride_zb="i32", stride_pm="i32",
        stride_dzm="i32", stride_dzb="i32")
    for dt in ("bf16", "fp16", "fp32"):
        for prec in (["ieee", "tf32"] if dt == "fp32" else ["ieee"]):
            fma = dt == "fp32" and prec == "ieee"
            cfgs = [c for c in allcfg if getattr(c, "scale_fast_fma", False) == fma] or allcfg
            for nseg, both in ((2, True), (1, True), (1, False)):
                for has_w in (True, False):
                    full = not quick and nseg == 2 and has_w and prec == "ieee"
                    for ci, cfg in enumerate(cfgs if full else cfgs[:1]):
                        kw, nw, ns = dict(cfg.kwargs), cfg.num_warps, cfg.num_stages
                        for even in ((True, False) if ci == 0 else (True,)):
                            ce = dict(HAS_W=has_w, BOTH_DIR=both, NSEG=nseg, PRECISION=prec,
                                      DOT_F32=False, EVEN_D=even, **kw)
                            tag = (f"{dt} {prec} nseg={nseg} both={both} w={has_w} {kw} "
                                   f"w{nw} s{ns} even_d={even}")
                            jobs.append((f"contrastive_fwd {tag}", con._contrastive_fwd_kernel,
                                         dict(fwd_types, z_ptr=PTR[dt]), ce, nw, ns, even))
                            jobs.append((f"contrastive_bwd {tag}", con._contrastive_bwd_kernel,
                                         dict(bwd_types, z_ptr=PTR[dt]),
                                         dict(ce, NPOS=2 if both else 1, GROUP=8), nw, ns, even))
    # Triton specializes integer arguments equal to 1 as constants: B = 1, D = 1
    for dt in ("bf16", "fp32"):
        fma = dt == "fp32"
        cfg = ([c for c in allcfg if getattr(c, "scale_fast_fma", False) == fma] or allcfg)[0]
        kw, nw, ns = dict(cfg.kwargs), cfg.num_warps, cfg.num_stages
        for ones in (dict(B=1, stride_pm=1), dict(D=1, stride_zb=1, stride_dzb=1)):
            for nseg, both in ((2, True), (1, False)):
                ce = dict(HAS_W=True, BOTH_DIR=both, NSEG=nseg, PRECISION="ieee", DOT_F32=False,
                          EVEN_D="B" in ones, **kw)
                ft = dict(fwd_types, z_ptr=PTR[dt])
                bt = dict(bwd_types, z_ptr=PTR[dt])
                fce = dict(ce, **{k: v for k, v in ones.items() if k in ft})
                bce = dict(ce, NPOS=2 if both else 1, GROUP=8, **{k: v for k, v in ones.items() if k in bt})
                jobs.append((f"contrastive_fwd {dt} nseg={nseg} {ones}", con._contrastive_fwd_kernel,
                             ft, fce, nw, ns, True))
                jobs.append((f"contrastive_bwd {dt} nseg={nseg} {ones}", con._contrastive_bwd_kernel,
                             bt, bce, nw, ns, True))
    # B * D >= 2^31: the M strides arrive as int64
    for dt in ("bf16", "fp32"):
        fma = dt == "fp32"
        cfg = ([c for c in allcfg if getattr(c, "scale_fast_fma", False) == fma] or allcfg)[0]
        kw, nw, ns = dict(cfg.kwargs), cfg.num_warps, cfg.num_stages
        ce = dict(HAS_W=True, BOTH_DIR=True, NSEG=2, PRECISION="ieee", DOT_F32=False, EVEN_D=True, **kw)
        jobs.append((f"contrastive_fwd {dt} int64 strides", con._contrastive_fwd_kernel,
                     dict(fwd_types, z_ptr=PTR[dt], stride_zm="i64"), ce, nw, ns, True))
        jobs.append((f"contrastive_bwd {dt} int64 strides", con._contrastive_bwd_kernel,
                     dict(bwd_types, z_ptr=PTR[dt], stride_zm="i64", stride_dzm="i64"),
                     dict(ce, NPOS=2, GROUP=8), nw, ns, True))
    return jobs


def scores_jobs(sc):
    jobs = []
    for dt in ("bf16", "fp16", "fp32"):
        for M in (2, 3, 5, 8):
            MP, BB, BD = sc._blocks(M, 4096)
            ce = dict(MP=MP, BLOCK_B=BB, BLOCK_D=BD)
            base = dict(M="i32", B="i32", D="i32", stride_zm="i32", stride_zb="i32", stride_pm="i32")
            jobs.append((f"scores_sample_fwd {dt} M={M}", sc._scores_sample_fwd_kernel,
                         dict(base, z_ptr=PTR[dt], pres_ptr="*u8", s_ptr="*fp32", sp_ptr="*fp32"),
                         ce, 4, 2, True))
            jobs.append((f"scores_batch_gram {dt} M={M}", sc._scores_batch_gram_kernel,
                         dict(base, z_ptr=PTR[dt], pres_ptr="*u8", part_ptr="*fp32"), ce, 4, 2, True))
            for from_scores in (True, False):
                jobs.append((f"scores_bwd {dt} M={M} from_scores={from_scores}", sc._scores_bwd_kernel,
                             dict(base, z_ptr=PTR[dt], pres_ptr="*u8", s_ptr="*fp32", ds_ptr="*fp32",
                                  dsp_ptr="*fp32", dg_ptr="*fp32", dz_ptr=PTR[dt], stride_dzm="i32",
                                  stride_dzb="i32", stride_gb="i32"),
                             dict(ce, FROM_SCORES=from_scores), 4, 2, True))
    jobs.append(("scores_sample_fwd fp32 M=3 no hints, int64 strides", sc._scores_sample_fwd_kernel,
                 dict(M="i32", B="i32", D="i32", stride_zm="i64", stride_zb="i32", stride_pm="i32",
                      z_ptr="*fp32", pres_ptr="*u8", s_ptr="*fp32", sp_ptr="*fp32"),
                 dict(zip(("MP", "BLOCK_B", "BLOCK_D"), sc._blocks(3, 4096))), 4, 2, False))
    # integer arguments equal to 1 become constants: B = 1, M = 1, D = 1
    for ones in (dict(B=1, stride_pm=1), dict(M=1), dict(D=1, stride_zb=1, stride_dzb=1)):
        M = ones.get("M", 3)
        ce = dict(zip(("MP", "BLOCK_B", "BLOCK_D"), sc._blocks(M, 1 if "B" in ones else 4096)))
        for name, k, ty in [(n, kk, t) for n, kk, t, *_ in jobs if n.endswith(" M=3") or n.endswith("from_scores=True")]:
            if not name.startswith(("scores_sample_fwd fp32", "scores_batch_gram fp32", "scores_bwd fp32 M=3")):
                continue
            c = dict(ce, **{kk: v for kk, v in ones.items() if kk in ty})
            if "FROM_SCORES" in _jit(k).arg_names:
                c["FROM_SCORES"] = True
            jobs.append((f"{name} {ones}", k, ty, c, 4, 2, True))
    return jobs


def main():
    quick = "--quick" in sys.argv
    sc = _load("scores")
    con = _load("contrastive")
    jobs = scores_jobs(sc) + contrastive_jobs(con, quick)
    print(f"triton {triton.__version__}: compiling {len(jobs)} kernel variants for {TARGET}", flush=True)
    failures = 0
    t0 = time.time()
    for name, kernel, types, ce, nw, ns, hints in jobs:
        t = time.time()
        try:
            ck = compile_one(kernel, types, ce, nw, ns, hints)
            md = ck.metadata
            print(f"  ok   {name}  ({time.time() - t:.1f}s, shared={getattr(md, 'shared', '?')}, "
                  f"regs={getattr(ck, 'n_regs', '?')})", flush=True)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"  FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            traceback.print_exc(limit=3)
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.time() - t0:.0f}s")
    if failures:
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
