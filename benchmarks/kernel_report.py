"""Static report of every Triton kernel of scale_fast, compiled for a GPU without one.

    python benchmarks/kernel_report.py                 # every kernel, every config the autotuner may pick
    python benchmarks/kernel_report.py --quick         # one representative case per kernel (the CI test)
    python benchmarks/kernel_report.py --arch sm_90a --arch sm_80 --filter contrastive

Each case runs Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas, cubin) for the named
architecture on the CPU, then reads:

* from ptxas -v: registers per thread, spill stores / loads (bytes) and the stack frame;
* from Triton's metadata: the shared memory of one program;
* CTAs per SM: min over registers (64K per SM, allocated per warp in units of 256),
  shared memory (228 KiB per SM and 1 KiB reserved per CTA on sm_90, 164 KiB on sm_80),
  warps (64 per SM) and the 32-CTA limit;
* from the SASS (nvdisasm): MEMBAR.*.GPU / .SYS fences and atomics (ATOM*, RED*) that carry
  such a fence (the default acq_rel semantics of tl.atomic_add), each flagged when it lies
  inside a loop (between a backward branch and its target); HGMMA (wgmma) / HMMA counts;
* the hot loops (the innermost loops that hold an MMA; without one, the longest innermost loop):
  SASS instructions of the largest ("hot"; "outer": of the loop around it, e.g. a column-tile
  loop whose softmax epilogue follows an inner D loop), the FSELs that write an MMA accumulator
  register ("fsel": a select that resets the accumulator), and the pendings of each wgmma wait
  ("waits", WARPGROUP.DEPBAR.LE gsb0, N, loops separated by "|": N >= 1 lets the MMA run on while
  the loop goes on, 0 waits for every MMA);
* from the TTGIR: the stages actually used ("stg": the buffer count of the pipelined loads'
  shared-memory rings; 1 = not pipelined).

A case fails on a compile error, on spilled bytes, on a fenced atomic, on a GPU-scope
MEMBAR inside a loop, or (16-bit contrastive forward and dG kernels on sm_90a) on hot loops
that all wait for every wgmma (pendings 0), for every config the autotuner can choose (configs whose shared memory
exceeds the SM limit are listed as "no fit": the autotuner skips them).  The set of configs
the autotuner may pick is read from the kernels' own autotuner objects and their pruning
functions, so the report follows the code.  Results are cached by the kernels' source hash
(``SCALE_FAST_KERNEL_REPORT_CACHE``, default ~/.cache/scale_fast/kernel_report.json).

The contrastive forward also reports its programs per SM at B = 4096 and above (assuming 132 SMs,
an H100/H200 SXM): the grid is sized from the SM count, so this is >= 2 by construction.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report: unset TRITON_INTERPRET (the report compiles for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSUMED_SMS = 132  # H100 / H200 SXM

# per-SM limits: registers, shared memory (per SM, per CTA max), reserved per CTA, warps, CTAs
ARCHS = {
    "sm_90a": dict(cap=90, regs=65536, smem_sm=228 * 1024, smem_cta=227 * 1024, reserved=1024, warps=64, ctas=32),
    "sm_80": dict(cap=80, regs=65536, smem_sm=164 * 1024, smem_cta=163 * 1024, reserved=1024, warps=64, ctas=32),
}
REPORT_VERSION = 5  # bump when analyse() reads more: older cache entries lack the new fields
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    kernel: str          # report name of the kernel
    variant: str         # dtype / flags
    fn: object           # the triton JITFunction
    types: dict          # argument name -> triton type string (non-constexpr arguments)
    constexprs: dict     # argument name -> value
    num_warps: int
    num_stages: int
    config: str          # the config's label
    pickable: bool = True  # the autotuner (after pruning) may choose it
    grid_note: str = ""
    programs_per_sm: float | None = None  # fewest programs per SM over B >= 4096 (grids sized by the host)
    no_hint: tuple = ()  # arguments not specialised as divisible by 16 (odd D)
    overlap: bool = False  # fail on sm_90a when every wgmma wait of the hot loop has pendings 0

    def key(self, arch: str) -> str:
        h = hashlib.sha256()
        h.update(repr((REPORT_VERSION, self.fn.cache_key, self.no_hint, sorted(self.types.items()), sorted((k, repr(v)) for k, v in self.constexprs.items()),
                       self.num_warps, self.num_stages, arch, triton.__version__)).encode())
        return h.hexdigest()[:32]


def jit_of(kernel):
    """The JITFunction under triton.autotune / triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _heuristics(kernel):
    out = {}
    k = kernel
    from triton.runtime.jit import JITFunction

    while not isinstance(k, JITFunction):
        if hasattr(k, "values") and isinstance(getattr(k, "values"), dict):
            out.update(k.values)
        k = k.fn
    return out


def pickable_configs(kernel, nargs: dict, kwargs: dict):
    """(all configs, those the autotuner may choose for a call like nargs/kwargs)."""
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        by = getattr(kernel, "prune_configs_by", None) or {}
        prune = by.get("early_config_prune") if isinstance(by, dict) else None
    chosen = prune(configs, nargs, **kwargs) if prune else configs
    return configs, list(chosen)


def _fill_types(fn, types: dict, constexprs: dict) -> dict:
    """Types for every runtime argument: explicit ones, then *_ptr -> *fp32, else i32."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in types:
            out[name] = types[name]
        elif name.endswith("_ptr"):
            out[name] = "*fp32"
        else:
            out[name] = "i32"
    return out


ALL_CONFIGS = False  # --all-configs: also the configs the pruner drops for the call (marked "not picked")


def autotuned_cases(kernel, name, variant, types, constexprs, nargs, kwargs, *, full=True, extra=None):
    """One case per config of an autotuned kernel that it may pick (full), or its first such config."""
    fn = jit_of(kernel)
    allc, chosen = pickable_configs(kernel, nargs, kwargs)
    heur = _heuristics(kernel)
    cases = []
    for cfg in allc:
        pick = any(cfg is c for c in chosen)  # identity: two classes may hold equal configs
        if not pick and not (full and ALL_CONFIGS):
            continue
        ce = dict(constexprs)
        ce.update(cfg.kwargs)
        args = dict(nargs, **ce)
        args.update({k: v for k, v in (extra or {}).items()})
        for hname, hfun in heur.items():
            if hname not in ce:
                ce[hname] = hfun(args)
        for pname, p in zip(fn.arg_names, fn.params):
            if p.is_constexpr and pname not in ce and p.has_default:
                ce[pname] = p.default
        label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items() if not k.startswith(("GROUP", "STAGES"))) + \
            f" w{cfg.num_warps} s{cfg.num_stages}"
        cases.append(Case(name, variant, fn, _fill_types(fn, types, ce), ce, cfg.num_warps, cfg.num_stages,
                          label, pick))
        if not full:
            break
    return cases


def _fake(dtype):
    return torch.empty(0, dtype=dtype)


def contrastive_cases(full: bool):
    """Forward (main and exact-fallback) and backward dG kernels: every pickable config for the
    main variants (full: every dtype class, form, weights on/off, row_range, odd D)."""
    from scale_fast.backends.triton import contrastive as con, contrastive_kernels as kern

    cases = []
    classes = [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")] if full else [("bf16", "ieee")]
    forms = [("ntxent", 2, True), ("clip", 1, True), ("nce", 1, False)] if full else [("ntxent", 2, True)]
    base = dict(pres_ptr="*u8", w_ptr="*fp32", pi_ptr="*i32", pj_ptr="*i32", scale_ptr="*fp32")
    for dt, prec in classes:
        ptr = "*" + dt
        nargs = dict(z_ptr=_fake(TORCH_DT[dt]), PRECISION=prec)
        for form, nseg, both in forms:
            for local in ((False, True) if full and both else (False,)):
                for has_w in ((True, False) if full else (True,)):
                    for even in (True,):  # the host pads D to a multiple of every BLOCK_D (_pad_d)
                        ce = dict(HAS_W=has_w, BOTH_DIR=both, NSEG=nseg, LOCAL=local, PRECISION=prec, DOT_F32=False)
                        extra = {} if even else dict(D=33)
                        variant = f"{dt} {prec} {form}{' rows' if local else ''}{'' if has_w else ' no-w'}" + \
                            ("" if even else " odd-D")
                        cs = autotuned_cases(kern._contrastive_fwd_kernel, "contrastive_fwd", variant,
                                             dict(base, z_ptr=ptr), ce, dict(nargs, D=512 if even else 33), ce,
                                             full=full, extra=extra)
                        for c in cs:
                            c.no_hint = () if even else ("stride_zm", "stride_zb")
                            block = c.constexprs["BLOCK"]
                            worst = min(
                                con.forward_programs(B, block, 1, "clip" if nseg == 1 else "ntxent", ASSUMED_SMS,
                                                     row_range=(0, B // 8) if local else None) / ASSUMED_SMS
                                for B in (4096, 6144, 8192, 16384, 32768, 65536, 100000))
                            c.programs_per_sm = round(worst, 2)
                            c.grid_note = f"[>= {worst:.1f} programs/SM at B >= 4096, 1 pair, {ASSUMED_SMS} SMs]"
                            c.overlap = dt != "fp32"
                        cases += cs
            if both:
                ce = dict(HAS_W=True, NSEG=nseg, PRECISION=prec, DOT_F32=False)
                cases += autotuned_cases(kern._contrastive_fwd_fallback_kernel, "contrastive_fwd_fallback",
                                         f"{dt} {prec} {form}", dict(base, z_ptr=ptr), ce, dict(nargs, D=512), ce,
                                         full=full)
        # (row term, column term, column statistics): the mirrored blocks of both directions, then
        # the one-direction and row_range jobs
        terms = [(True, True, True), (True, False, False), (False, True, False)] if full else [(True, True, True)]
        for row_term, col_term, col_stats in terms:
            ce = dict(HAS_W=True, ROW_TERM=row_term, COL_TERM=col_term, COL_STATS=col_stats, PRECISION=prec,
                      DOT_F32=False)
            types = dict(base, z_ptr=ptr, dg_ptr="*bf16" if dt == "bf16" else "*fp32")
            label = "mirrored row+col" if col_stats else ("row" if row_term else "col")
            dg = autotuned_cases(kern._contrastive_dg_kernel, "contrastive_bwd_dg", f"{dt} {prec} {label}",
                                 types, ce, dict(nargs, D=512), ce, full=full)
            for c in dg:
                c.overlap = dt != "fp32"
            cases += dg
    return cases


def scores_cases(full: bool):
    from scale_fast.backends.triton import scores as sc

    cases = []
    base = dict(M="i32", B="i32", D="i32", stride_zm="i32", stride_zb="i32", stride_pm="i32")
    for dt in (("bf16", "fp16", "fp32") if full else ("fp32",)):
        ptr = "*" + dt
        for M in ((2, 3, 5, 8, 16) if full else (5,)):
            MP, BB, BD = sc._blocks(M, 4096)
            ce = dict(MP=MP, BLOCK_B=BB, BLOCK_D=BD)
            label = f"MP={MP},BLOCK_B={BB},BLOCK_D={BD} w4 s3"
            for kname, types, extra in (
                ("scores_sample_fwd", dict(base, z_ptr=ptr, pres_ptr="*u8", s_ptr="*fp32", sp_ptr="*fp32"), {}),
                ("scores_batch_gram", dict(base, z_ptr=ptr, pres_ptr="*u8", part_ptr="*fp32"), {}),
                ("scores_bwd", dict(base, z_ptr=ptr, pres_ptr="*u8", s_ptr="*fp32", ds_ptr="*fp32", dsp_ptr="*fp32",
                                    dg_ptr="*fp32", dz_ptr=ptr, stride_dzm="i32", stride_dzb="i32",
                                    stride_gb="i32"), dict(FROM_SCORES=True)),
            ):
                k = getattr(sc, f"_{kname}_kernel")
                fn = jit_of(k)
                c = dict(ce, **extra)
                cases.append(Case(kname, f"{dt} M={M}", fn, _fill_types(fn, types, c), c, 4, 3, label))
    return cases


def linear_ce_cases(full: bool):
    """The linear cross-entropy kernels at every config their pruner keeps, per config class."""
    from scale_fast.backends.triton import linear_ce as lce

    if hasattr(lce, "_lce_row_kernel"):
        return _lce_row_cases(lce, full)
    fwd = getattr(lce, "_lce_fwd")
    bwd = getattr(lce, "_lce_bwd")
    cases = []
    classes = [("bf16", "ieee", False), ("bf16", "ieee", True), ("fp16", "ieee", False), ("fp32", "tf32", False),
               ("fp32", "ieee", False)]
    if not full:
        classes = classes[:1]
    for dt, prec, soft in classes:
        ptr = "*" + dt
        types = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr, s_ptr="*fp32", t_ptr="*fp32" if soft else "*i64",
                     dh_ptr=ptr, dw_ptr="*fp32", g_ptr=ptr, N="i32", K="i32", H="i32")
        flags = dict(HAS_BIAS=True, HAS_SCALE=True, SOFT=soft, PRECISION=prec, DOT_F32=False)
        nargs = dict(h_ptr=_fake(TORCH_DT[dt]), w_ptr=_fake(TORCH_DT[dt]), SOFT=soft, PRECISION=prec)
        variant = f"{dt} {prec}{' soft' if soft else ''}"
        cases += autotuned_cases(fwd, "lce_fwd", variant, types, flags, nargs, flags, full=full)
        bflags = dict(flags, NEED_DH=True, NEED_DW=True, NEED_DB=True, NEED_DS=True, NEED_DT=soft,
                      STORE_G=True)
        cases += autotuned_cases(bwd, "lce_bwd", variant + " chunked", types, bflags, nargs, bflags, full=full)
        if full:
            fl = dict(bflags, STORE_G=False)
            cases += autotuned_cases(bwd, "lce_bwd", variant + " fused", types, fl, nargs, fl, full=True)
    return cases


def _lce_row_cases(lce, full: bool):
    """The row kernel of the chunked linear cross-entropy (logits by cuBLAS, one program per row)."""
    fn = jit_of(lce._lce_row_kernel)
    cases = []
    for xdt in (("fp32", "bf16") if full else ("fp32",)):
        for gdt in ((xdt, "bf16") if xdt == "fp32" else (xdt,)):
            for soft in ((False, True) if full else (False,)):
                for has_lse in ((False, True) if full else (False,)):
                    ce = dict(HAS_BIAS=True, HAS_SCALE=True, SOFT=soft, HAS_LSE=has_lse, GRAD=True, NEED_DS=True,
                              NEED_DT=soft, NARROW_G=gdt != xdt, BLOCK_K=lce.BLOCK_K)
                    ce = {k: v for k, v in ce.items() if k in fn.arg_names}
                    types = dict(x_ptr="*" + xdt, g_ptr="*" + gdt, b_ptr="*" + xdt, t_ptr="*fp32" if soft else "*i64",
                                 K="i32", ignore_index="i32")
                    variant = f"x {xdt} g {gdt}{' soft' if soft else ''}{' lse-in' if has_lse else ''}"
                    cases.append(Case("lce_row", variant, fn, _fill_types(fn, types, ce), ce, lce.NUM_WARPS, 3,
                                      f"BLOCK_K={lce.BLOCK_K} w{lce.NUM_WARPS}"))
    return cases


def siglip_cases(full: bool):
    """The sigmoid (SigLIP) pair-loss kernels at the tiles the host picks for each D and dtype."""
    from scale_fast.backends.triton import siglip as sg

    cases = []
    for dt in (("bf16", "fp16", "fp32") if full else ("bf16",)):
        for D in ((64, 128, 256, 512, 768) if full else (512,)):
            for kname, kernel, extra in sg.report_kernels(TORCH_DT[dt], D):
                fn = jit_of(kernel)
                ce = {k: v for k, v in extra.items() if k in fn.arg_names}
                warps, stages = extra.get("num_warps", 4), extra.get("num_stages", 3)
                ptrs = dict(Q="*" + dt, K="*" + dt, POS="*i64", E="*" + dt if dt != "fp32" else "*fp32")
                types = {n: ptrs.get(n, "*fp32" if n in ("RS", "BIAS", "LOSS", "PG", "PS") else
                                     "fp32" if n == "coef" else "i32") for n in fn.arg_names if n not in ce}
                label = ",".join(f"{k}={v}" for k, v in ce.items() if k.startswith("BLOCK")) + f" w{warps} s{stages}"
                c = Case(kname, f"{dt} D={D}", fn, types, ce, warps, stages, label)
                cases.append(c)
    return cases


FAMILIES = {"contrastive": contrastive_cases, "scores": scores_cases, "linear_ce": linear_ce_cases,
            "siglip": siglip_cases}


# --------------------------------------------------------------------------------------------
# compile and read
# --------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_case(case: Case, arch: str):
    """Compile; returns (ptxas log, shared bytes, cubin bytes, TTGIR text)."""
    from triton import knobs
    from triton.compiler import ASTSource

    cap = ARCHS[arch]["cap"]
    src = ASTSource(fn=case.fn, signature=dict(case.types, **{k: "constexpr" for k in case.constexprs}),
                    constexprs=case.constexprs, attrs=_attrs(case))
    buf = io.StringIO()
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                               options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    return buf.getvalue(), int(k.metadata.shared), k.asm["cubin"], k.asm.get("ttgir", "")


def _attrs(case: Case):
    """16-byte alignment for pointers, divisibility by 16 for the leading strides (as the JIT
    specialises them on real tensors); sizes stay unhinted (odd B, N, K)."""
    out = {}
    for i, name in enumerate(case.fn.arg_names):
        ty = case.types.get(name)
        if ty is None:
            continue
        if name in case.no_hint:
            continue
        if ty.startswith("*") or (name.startswith("stride_") and ty == "i32" and not name.endswith(("pm", "tn"))):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs[-1]) if regs else -1,
                spill_st=int(spill[-1][0]) if spill else 0, spill_ld=int(spill[-1][1]) if spill else 0,
                stack=int(stack[-1]) if stack else 0)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def sass_of(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True)
        if res.returncode != 0:
            res = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    return res.stdout


def scan_sass(sass: str) -> dict:
    """Fences and atomics, and which of them lie inside a loop (a backward branch's span)."""
    insns, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            insns.append((addr, m.group(2)))
    loops = []
    for addr, text in insns:
        if re.search(r"\bBRA\b", text):
            t = _TARGET.search(text)
            if t and t.group(1) in labels and labels[t.group(1)] <= addr:
                loops.append((labels[t.group(1)], addr))

    def in_loop(a):
        return any(lo <= a <= hi for lo, hi in loops)

    def op(text):
        return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text.strip() else ""

    hot = _hot_loop(insns, loops, op)
    gpu_fence = re.compile(r"^MEMBAR\.(\w+\.)?(GPU|SYS)")
    out = dict(membar=0, membar_loop=0, atomics=0, fenced_atomics=0, fenced_atomics_loop=0, hgmma=0, hmma=0,
               local=0)
    for i, (addr, text) in enumerate(insns):
        o = op(text)
        if gpu_fence.match(o):
            out["membar"] += 1
            out["membar_loop"] += in_loop(addr)
        if o.startswith(("ATOM", "RED")) and not o.startswith("REDUX"):
            out["atomics"] += 1
            near = [op(t) for _, t in insns[max(0, i - 4):i]] + [op(t) for _, t in insns[i + 1:i + 3]]
            if any(gpu_fence.match(x) or x.startswith("CCTL.IVALL") for x in near):
                out["fenced_atomics"] += 1
                out["fenced_atomics_loop"] += in_loop(addr)
        if o.startswith("HGMMA"):
            out["hgmma"] += 1
        if o.startswith("HMMA"):
            out["hmma"] += 1
        if o.startswith(("LDL", "STL")):
            out["local"] += 1
    out.update(hot)
    return out


_HGMMA = re.compile(r"HGMMA\.64x(\d+)x\d+\.(F32|F16)\S*\s+R(\d+)")
_HMMA = re.compile(r"HMMA\.\w+\.(F32|F16)\S*\s+R(\d+)")
_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)")
_DST = re.compile(r"^\S+\s+R(\d+)")


def _hot_loop(insns, loops, op) -> dict:
    """The innermost loops holding an MMA (a kernel may hold several copies of its loop, e.g. one per
    constexpr path), else the longest innermost loop: the largest one's instruction count and that
    of the loop around it, the FSELs writing an accumulator register of their MMAs, the pendings of
    their wgmma waits (per loop in loop_waits), and whether one of them keeps a wgmma in flight (a
    wait with pendings >= 1; True without any wait)."""
    def body(lo, hi):
        return [(a, t) for a, t in insns if lo <= a <= hi]

    def has_mma(lo, hi):
        return any(op(t).startswith(("HGMMA", "HMMA")) for _, t in body(lo, hi))

    def innermost(cands):
        return [lp for lp in cands if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in cands)]

    hot = innermost([lp for lp in loops if has_mma(*lp)])
    if not hot:
        inner = innermost(loops)
        hot = [max(inner, key=lambda lp: len(body(*lp)))] if inner else []
    out = dict(hot_insns=0, outer_insns=0, acc_fsel=0, waits=[], loop_waits=[])
    for lo, hi in hot:
        insns_in = body(lo, hi)
        # the loop around it (a tile loop whose epilogue follows an inner MMA loop), 0 when none
        outer = [lp for lp in loops if lp != (lo, hi) and lp[0] <= lo and hi <= lp[1]]
        out["outer_insns"] = max(out["outer_insns"],
                                 len(body(*min(outer, key=lambda lp: lp[1] - lp[0]))) if outer else 0)
        out["hot_insns"] = max(out["hot_insns"], len(insns_in))
        acc = set()
        for _, t in insns_in:
            text = re.sub(r"^@!?U?P\w+\s+", "", t)
            m = _HGMMA.match(text)
            if m:  # a 64 x N warpgroup tile: N/2 fp32 (N/4 packed fp16) registers per thread
                n, base = int(m.group(1)), int(m.group(3))
                acc.update(range(base, base + (n // 2 if m.group(2) == "F32" else n // 4)))
            m = _HMMA.match(text)
            if m:  # one m16n8 fragment: 4 fp32 (2 packed fp16) registers
                base = int(m.group(2))
                acc.update(range(base, base + (4 if m.group(1) == "F32" else 2)))
        waits = []
        for _, t in insns_in:
            text = re.sub(r"^@!?U?P\w+\s+", "", t)
            if text.startswith("FSEL"):
                m = _DST.match(text)
                out["acc_fsel"] += bool(m and int(m.group(1)) in acc)
            m = _WAIT.search(text)
            if m:
                waits.append(int(m.group(1), 0))
        out["waits"] += waits
        out["loop_waits"].append(waits)
    # a kernel may keep a rare path's copy of its loop unpipelined: one loop in flight is enough
    out["overlapped"] = not out["waits"] or any(w and max(w) >= 1 for w in out["loop_waits"])
    return out


_RING = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x")


def stages_used(ttgir: str) -> int:
    """Buffers of the pipelined loads' shared-memory rings (1: the loop is not pipelined)."""
    rings = [int(n) for n in _RING.findall(ttgir)]
    return max(rings) if rings else 1


def occupancy(regs: int, smem: int, num_warps: int, arch: str):
    """(CTAs per SM, the limiting resource)."""
    a = ARCHS[arch]
    if smem > a["smem_cta"]:
        return 0, "smem"
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = a["regs"] // per_warp
    lim = {
        "regs": warps_by_regs // num_warps,
        "smem": a["smem_sm"] // (smem + a["reserved"]) if smem else a["ctas"],
        "warps": a["warps"] // num_warps,
        "ctas": a["ctas"],
    }
    which = min(lim, key=lambda k: lim[k])
    return lim[which], which


def analyse(case: Case, arch: str, cache: dict) -> dict:
    key = case.key(arch)
    if key in cache:
        return dict(cache[key], cached=True)
    t0 = time.time()
    try:
        log, smem, cubin, ttgir = compile_case(case, arch)
    except Exception as exc:  # noqa: BLE001  (every failure is reported)
        msg = " | ".join(str(exc).strip().splitlines()[:6])
        if "out of resource" in msg.lower() or "OutOfResources" in type(exc).__name__:
            return dict(error=None, nofit=True, note=msg[:200], seconds=time.time() - t0)
        return dict(error=f"{type(exc).__name__}: {msg[:600]}", seconds=time.time() - t0)
    info = parse_ptxas(log)
    info.update(scan_sass(sass_of(cubin)))
    info.update(smem=smem, stages=stages_used(ttgir), seconds=round(time.time() - t0, 1), error=None)
    info["ctas"], info["limit"] = occupancy(info["regs"], smem, case.num_warps, arch)
    info["nofit"] = smem > ARCHS[arch]["smem_cta"]
    cache[key] = info
    return info


def verdict(case: Case, info: dict, arch: str = "sm_90a") -> list:
    """Why a case fails (empty: it passes)."""
    if info.get("error"):
        return ["compile error"]
    if info.get("nofit"):
        return []  # the autotuner skips a config that does not fit
    bad = []
    if not case.pickable:
        return bad
    if info["spill_st"] or info["spill_ld"]:
        bad.append(f"spills {info['spill_st']}/{info['spill_ld']} B")
    if info["fenced_atomics"]:
        bad.append(f"{info['fenced_atomics']} fenced atomics")
    if info["membar_loop"]:
        bad.append(f"{info['membar_loop']} GPU MEMBAR in loops")
    if case.overlap and arch == "sm_90a" and not info["overlapped"]:
        bad.append("hot loop waits for every MMA (wgmma pendings 0)")
    return bad


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _cache_path() -> str:
    return os.environ.get("SCALE_FAST_KERNEL_REPORT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "scale_fast", "kernel_report.json"))


def load_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        pass


HEADER = (f"{'kernel':<22} {'variant':<26} {'config':<44} {'arch':<6} {'regs':>4} {'spill':>9} {'stack':>5} "
          f"{'smem KiB':>8} {'CTA/SM':>9} {'mma':>9} {'fenced':>6} {'MEMBAR@loop':>11} {'stg':>3} {'hot':>5} {'outer':>5} "
          f"{'fsel':>4} {'waits':>7}  verdict")


def format_row(case: Case, arch: str, info: dict, bad: list) -> str:
    if info.get("error"):
        return f"{case.kernel:<22} {case.variant:<26} {case.config:<44} {arch:<6} ERROR {info['error']}"
    if info.get("nofit") and "regs" not in info:
        return f"{case.kernel:<22} {case.variant:<26} {case.config:<44} {arch:<6} no fit (autotune skips it)"
    mma = f"wgmma{info['hgmma']}" if info["hgmma"] else (f"mma{info['hmma']}" if info["hmma"] else "-")
    waits = "|".join(",".join(str(w) for w in lw) for lw in info.get("loop_waits", []) if lw) or "-"
    status = "FAIL: " + "; ".join(bad) if bad else ("ok" if case.pickable else "ok (not picked)")
    if info.get("nofit"):
        status = "no fit (autotune skips it)"
    return (f"{case.kernel:<22} {case.variant:<26} {case.config:<44} {arch:<6} {info['regs']:>4} "
            f"{info['spill_st']:>4}/{info['spill_ld']:<4} {info['stack']:>5} {info['smem'] / 1024:>8.1f} "
            f"{info['ctas']:>3} {info['limit']:<5} {mma:>9} {info['fenced_atomics']:>6} {info['membar_loop']:>11} "
            f"{info['stages']:>3} {info['hot_insns']:>5} {info['outer_insns']:>5} {info['acc_fsel']:>4} {waits:>7}  "
            f"{status}{(' ' + case.grid_note) if case.grid_note else ''}")


def collect(families, full: bool):
    cases = []
    for fam in families:
        cases += FAMILIES[fam](full)
    return cases


def run(cases, archs, out=sys.stdout, cache=None):
    """Analyse every case on every arch; returns [(case, arch, info, reasons)]."""
    cache = load_cache() if cache is None else cache
    rows = []
    print(f"triton {triton.__version__}, torch {torch.__version__}; {len(cases)} cases x {len(archs)} archs "
          f"(CTA/SM with its limiter; 'spill' = spill store/load bytes)", file=out, flush=True)
    print(HEADER, file=out, flush=True)
    for arch in archs:
        for case in cases:
            info = analyse(case, arch, cache)
            bad = verdict(case, info, arch)
            rows.append((case, arch, info, bad))
            print(format_row(case, arch, info, bad), file=out, flush=True)
            save_cache(cache)
    return rows


def write_json(rows, path: str) -> None:
    out = [dict(kernel=c.kernel, variant=c.variant, config=c.config, arch=arch, pickable=c.pickable,
                grid_note=c.grid_note, programs_per_sm=c.programs_per_sm, fail=bad, **{k: v for k, v in info.items() if k != "cached"})
           for c, arch, info, bad in rows]
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one representative case per kernel")
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: sm_90a and sm_80")
    ap.add_argument("--filter", default="", help="only kernel families whose name contains this")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--all-configs", action="store_true", help="also configs the pruner drops for a variant")
    args = ap.parse_args(argv)
    global ALL_CONFIGS
    ALL_CONFIGS = args.all_configs
    archs = args.arch or ["sm_90a", "sm_80"]
    fams = [f for f in FAMILIES if args.filter in f]
    t0 = time.time()
    rows = run(collect(fams, not args.quick), archs)
    failed = [r for r in rows if r[3]]
    if args.json:
        write_json(rows, args.json)
    print(f"\n{len(rows)} cases in {time.time() - t0:.0f}s; {len(failed)} failing", flush=True)
    for case, arch, info, bad in failed:
        print(f"  FAIL {case.kernel} [{case.variant}] {case.config} {arch}: {'; '.join(bad)}"
              + (f" ({info['error']})" if info.get("error") else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
