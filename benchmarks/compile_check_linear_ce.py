"""Compile the linear cross-entropy row kernel for an H100/H200 (sm_90a) without a GPU.

The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run) accepts code that the real
compiler rejects, so this runs the full CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas)
for sm_90a on every variant of ``_lce_row_kernel`` the backend launches (bf16 / fp16 / fp32 /
fp64 logits-gradient dtypes, hard and soft targets, with and without bias, scale, saved lse,
gradients) and reports registers, spills, atomics and memory fences.  Prints "OK" at the end
when every variant compiled with no spills and no atomics.

    python benchmarks/compile_check_linear_ce.py        # must NOT have TRITON_INTERPRET=1
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile


def _ptxas(ptx: str):
    """(registers, spill store bytes, spill load bytes) from ptxas -v for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90).path
    except TypeError:  # older triton
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(log.strip()[-400:])
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this compiles the CUDA kernel")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scale_fast.backends.triton import linear_ce as mod

    fn = mod._lce_row_kernel
    print(f"triton {triton.__version__}: _lce_row_kernel for sm_90a, BLOCK_K={mod.BLOCK_K}, "
          f"num_warps={mod.NUM_WARPS}", flush=True)
    ok = True
    # (operand dtype of G, soft, bias, scale, saved lse, gradients, d scale, d target)
    variants = []
    for gdt, soft, has_lse in itertools.product(["bf16", "fp16", "fp32", "fp64"], [False, True], [False, True]):
        variants.append((gdt, soft, True, True, has_lse, True, True, soft))
    variants += [("bf16", False, False, False, False, False, False, False),  # loss only
                 ("bf16", False, False, False, False, True, False, False)]  # plain mean, no bias / scale
    for gdt, soft, bias, scale, has_lse, grad, ds, dt in variants:
        acc = "fp64" if gdt == "fp64" else "fp32"
        types = dict(x_ptr=f"*{acc}", g_ptr=f"*{gdt}", b_ptr=f"*{acc}", s_ptr=f"*{acc}",
                     t_ptr="*bf16" if soft else "*i64", lse_in_ptr=f"*{acc}", c_ptr=f"*{acc}",
                     loss_ptr=f"*{acc}", lse_ptr=f"*{acc}", ds_ptr=f"*{acc}", dt_ptr=f"*{acc}",
                     K="i32", ignore_index="i32", stride_x="i32", stride_g="i32", stride_t="i32",
                     stride_tk="i32", stride_dt="i32")
        cx = dict(HAS_BIAS=bias, HAS_SCALE=scale, SOFT=soft, HAS_LSE=has_lse, GRAD=grad, NEED_DS=ds,
                  NEED_DT=dt, NARROW_G=gdt in ("bf16", "fp16"), BLOCK_K=mod.BLOCK_K)
        sig = {name: ("constexpr" if name in cx else types[name]) for name in fn.arg_names}
        label = (f"G {gdt:4} {'soft' if soft else 'hard'} bias={int(bias)} scale={int(scale)} lse_in={int(has_lse)} "
                 f"grad={int(grad)} ds={int(ds)} dt={int(dt)}")
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": mod.NUM_WARPS})
            ptx = k.asm["ptx"]
            regs, sst, sld = _ptxas(ptx)
            atomics = len(re.findall(r"\b(atom|red)\.", ptx))
            fences = len(re.findall(r"\bfence\.", ptx))
            bars = len(re.findall(r"\bbar\.sync|barrier\.sync", ptx))
            bad = sst > 0 or atomics > 0 or fences > 0
            ok &= not bad
            print(f"{'FAIL' if bad else 'ok  '} {label}  regs={regs} spill={sst}/{sld} atomics={atomics} "
                  f"fences={fences} barriers={bars} smem={k.metadata.shared}", flush=True)
        except Exception as exc:  # report every failure, then fail
            ok = False
            print(f"FAIL {label}: {type(exc).__name__}: {' | '.join(str(exc).strip().splitlines()[:6])}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
