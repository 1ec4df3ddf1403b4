"""The `scale-fast bench` ops under pytest-benchmark, for those who prefer it.

    pytest benchmarks/test_bench_pytest.py --benchmark-only          # small cases, CPU (or CUDA)
    pytest benchmarks/test_bench_pytest.py -k linear_ce --benchmark-group-by=param:size

Same op definitions, inputs and implementations as `scale-fast bench` (scale_fast/bench.py); every
case is first checked against the float64 naive reference, then one fwd+bwd is the benchmarked
call.  Not collected by the default `pytest` run (pyproject's testpaths is ["tests"]).
"""
from __future__ import annotations

import pytest
import torch

from scale_fast import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":   # as `scale-fast bench --threads auto`: the cores the load leaves free
    import os
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0])))
SIZES = {"contrastive_ntxent_m2": [256], "contrastive_clip_m2": [256], "contrastive_ntxent_m5": [256],
         "contrastive_clip_m5": [256], "linear_ce": [512], "jct": [16], "scale_loss_step": [128]}
OPS = bench.all_ops()


def _cases():
    for name, sizes in SIZES.items():
        for impl in OPS[name].impls(DEVICE):
            for x in sizes:
                marks = [pytest.mark.skip(reason=impl.skip)] if impl.skip else []
                yield pytest.param(name, impl.name, x, id=f"{name}-{impl.name}-{x}", marks=marks)


@pytest.mark.parametrize("op_name,impl_name,size", list(_cases()))
def test_op(benchmark, op_name, impl_name, size):
    op = OPS[op_name]
    impl = next(i for i in op.impls(DEVICE) if i.name == impl_name)
    inp = op.make_inputs(size, DEVICE, "quick")
    inp64 = bench._cast(inp, torch.float64)
    ref_loss, ref_grads = bench.make_step(lambda: op.reference[impl.ref](inp64), inp64)()
    step = bench.make_step(impl.build(inp), inp)
    loss, grads = step()
    tol = bench._tolerance(inp[inp["leaves"][0]].dtype)
    assert bench.rel_err(loss, ref_loss) <= tol
    assert max(bench.rel_err(g, r) for g, r in zip(grads, ref_grads) if g is not None) <= tol

    def call():
        step()
        bench.sync(DEVICE)
    benchmark.group = f"{op_name} size={size}"
    benchmark.extra_info.update(op=op_name, impl=impl_name, size=size)
    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
