"""What is specific to the compiled CPU backend (backend="cpp").

The float64-reference suite (test_contrastive, test_linear_ce, test_scale_loss, ...) runs
on "cpp" through conftest.BACKENDS whenever it is built.  Here: the build / fallback
machinery (a failed build degrades to torch with ONE warning), and the kernels' own code
paths -- many tiles with ragged edges, the online-max path, several threads, the at::mm
fallback of the tile GEMMs, many row blocks -- in bfloat16, float32 and float64.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import scale_fast as sf
from scale_fast import _dispatch
import scale_fast.backends.cpp  # noqa: F401  (sf.backends.cpp below)
from scale_fast.backends.cpp import _build
from conftest import LOW_RTOL, torch_gen

ROOT = Path(__file__).resolve().parents[1]
CPP = "cpp" in sf.available_backends()
needs_cpp = pytest.mark.skipif(not CPP, reason=f"backend 'cpp' not built: {_build.reason()}")


@pytest.fixture
def threads():
    """Run a test with a given number of intra-op threads, restored afterwards."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget the build attempt and the dispatcher's cache for the test; restore both after."""
    saved = dict(_build._state)
    monkeypatch.delitem(_dispatch._loaded, "cpp", raising=False)
    monkeypatch.delitem(_dispatch._load_errors, "cpp", raising=False)
    _build.reset()
    yield
    _build._state.update(saved)


# --------------------------------------------------------------------------- #
# build and fallback
# --------------------------------------------------------------------------- #
def test_import_does_not_build():
    code = ("import scale_fast, scale_fast.backends.cpp as cb\n"
            "from scale_fast.backends.cpp import _build\n"
            "assert not _build._state['tried'], 'import triggered the C++ build'\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_failed_build_falls_back_with_one_warning(monkeypatch, fresh_build):
    def broken():
        raise RuntimeError("Error building extension 'scale_fast_cpu'\nfoo.cpp:1: error: simulated failure")

    monkeypatch.setattr(_build, "_compile", broken)
    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="backend='cpp'.*unavailable.*simulated failure") as record:
        backends = sf.available_backends()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert "cpp" not in backends and "torch" in backends
    assert not sf.backends.cpp.is_available()
    assert "simulated failure" in sf.backends.cpp.unavailable_reason()

    e = torch.randn(2, 6, 5, generator=torch_gen(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, whatever is called next
        assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
        out = sf.multi_pair_info_nce(e)  # auto -> torch
        assert torch.isfinite(out).all()
        assert sf.backends.cpp.extension() is None
        with pytest.raises(ValueError, match="backend='cpp' is not available.*simulated failure"):
            sf.multi_pair_info_nce(e, backend="cpp")


def test_disabled_by_environment(monkeypatch, fresh_build):
    monkeypatch.setenv("SCALE_FAST_DISABLE_CPP", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "cpp" not in sf.available_backends()
    assert "SCALE_FAST_DISABLE_CPP" in sf.backends.cpp.unavailable_reason()


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-scale-fast")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _build._compile()


def test_build_settings():
    s = _build.build_settings()
    assert s["name"].startswith("scale_fast_cpu_")
    assert "-fopenmp" in s["extra_cflags"]
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        assert "scale_fast" in str(s["build_directory"])
    assert _build.source_path().is_file()


@needs_cpp
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    want = "cpp" if sf.backends.cpp.preferred_on_cpu else "torch"
    assert _dispatch.resolve_backend("auto", torch.device("cpu")) == want
    monkeypatch.setenv("SCALE_FAST_BACKEND", "torch")
    assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------- #
# contrastive kernels
# --------------------------------------------------------------------------- #
def _contrastive_case(seed, **kw):
    from test_contrastive import _run_case

    return _run_case("cpp", seed, **kw)


@needs_cpp
@pytest.mark.parametrize("form", ["ntxent", "clip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_contrastive_dtypes(form, dtype):
    tol = dict(rtol=LOW_RTOL, grtol=LOW_RTOL) if dtype == torch.bfloat16 else {}
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, grtol=1e-10)
    for seed in range(3):
        out = _contrastive_case(1100 + seed, M=3, B=[40, 77, 130][seed], D=[16, 33, 64][seed], pattern="random",
                                form=form, wkind="BMM", scale_kind="tensor", dtype=dtype, **tol)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@needs_cpp
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("form", ["ntxent", "clip"])
def test_contrastive_many_tiles(monkeypatch, threads, form, nthreads):
    """Tiny tiles: ragged last tiles, diagonal and off-diagonal tiles, thread-local accumulation."""
    import importlib

    mod = importlib.import_module("scale_fast.backends.cpp.contrastive")
    monkeypatch.setattr(mod, "TILE", 16)
    threads(nthreads)
    for k, (B, pattern, wkind) in enumerate([(17, "random", "BMM"), (50, "mixed", "MM"), (101, "all", None)]):
        _contrastive_case(1200 + k, M=3, B=B, D=33, pattern=pattern, form=form, wkind=wkind, scale_kind="tensor")
        _contrastive_case(1210 + k, M=3, B=B, D=9, pattern=pattern, form=form, wkind=wkind, scale_kind="tensor",
                          dtype=torch.float64, rtol=1e-10, grtol=1e-10)


@needs_cpp
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("form", ["ntxent", "clip"])
def test_contrastive_online_max_path(monkeypatch, threads, form, nthreads):
    """|s w| large: the online max replaces the fixed shift (float32 at 2 max|s w| > 60), over many tiles."""
    import importlib

    from conftest import assert_grad_close, assert_value_close, case_rng, make_embeddings, make_present, ref_leaf
    from reference import ref_pair_losses

    mod = importlib.import_module("scale_fast.backends.cpp.contrastive")
    monkeypatch.setattr(mod, "TILE", 16)
    threads(nthreads)
    for seed, (B, s_val) in enumerate([(45, 100.0), (70, 40.0), (33, 31.0)]):
        gen = torch_gen(1300 + seed)
        present = make_present(case_rng("cpp-online", seed), 3, B, "random")
        e = make_embeddings(gen, present, 16)
        w = torch.rand(B, 3, 3, generator=gen) + 0.5  # |s w| up to 1.5 s
        e_dev, w_dev = e.clone().requires_grad_(), w.clone().requires_grad_()
        s_dev = torch.tensor(s_val, requires_grad=True)
        out = sf.multi_pair_info_nce(e_dev, present, logit_scale=s_dev, weights=w_dev, form=form, backend="cpp")
        e_r, w_r, s_r = ref_leaf(e), ref_leaf(w), ref_leaf(s_dev)
        ref = ref_pair_losses(e_r, present, s_r, w_r, form)
        assert_value_close(out, ref, 1e-5, 2e-7 * 1.5 * s_val, f"{form} losses at s={s_val}")
        g_lib = torch.autograd.grad(out.sum(), [e_dev, w_dev, s_dev])
        g_ref = torch.autograd.grad(ref.sum(), [e_r, w_r, s_r])
        for name, a, b in zip(("embeddings", "weights", "logit_scale"), g_lib, g_ref):
            assert_grad_close(a, b, name=f"{form} d {name}")


@needs_cpp
def test_tile_gemm_through_aten():
    """The tile GEMMs through at::mm (used where torch exports no BLAS) give the same results."""
    ext = sf.backends.cpp.extension()
    u = torch.nn.functional.normalize(torch.randn(70, 19, generator=torch_gen(3)), dim=1)
    rs = torch.rand(70, generator=torch_gen(4)) * 20
    try:
        ext.set_direct_blas(False)
        lse_aten = ext.ntxent_forward(u, rs, 16)
        du_aten = ext.ntxent_backward(u, rs, lse_aten, 0.5, 16)[0]
        a, b = u[:35].contiguous(), u[35:].contiguous()
        cross_aten = ext.cross_backward(a, b, rs[:35].contiguous(), lse_aten[:35].contiguous(),
                                        lse_aten[35:].contiguous(), 0.5, 16)
        _contrastive_case(1400, M=3, B=40, D=16, pattern="random", form="ntxent", wkind="BMM", scale_kind="tensor")
    finally:
        ext.set_direct_blas(True)
    lse = ext.ntxent_forward(u, rs, 16)
    du = ext.ntxent_backward(u, rs, lse, 0.5, 16)[0]
    cross = ext.cross_backward(a, b, rs[:35].contiguous(), lse[:35].contiguous(), lse[35:].contiguous(), 0.5, 16)
    torch.testing.assert_close(lse, lse_aten, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(du, du_aten, rtol=1e-5, atol=1e-6)
    for x, y in zip(cross, cross_aten):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_info_nce_task_dtypes():
    """The "nce" masked task (one-direction InfoNCE) in bf16 / float64 against torch in float64."""
    from scale_fast.backends.cpp import info_nce as cpp_nce
    from scale_fast.backends.torch import info_nce as torch_nce

    gen = torch_gen(7)
    a = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen, dtype=torch.float64), dim=1)
    w = torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    ref_leaves = [x.clone().requires_grad_() for x in (a, b, w)]
    ref = torch_nce(*ref_leaves, 14.0)
    ref_g = torch.autograd.grad(ref, ref_leaves)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, LOW_RTOL)):
        leaves = [x.to(dtype).requires_grad_() for x in (a, b, w)]
        out = cpp_nce(*leaves, 14.0)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
        for g, r in zip(torch.autograd.grad(out, leaves), ref_g):
            assert g.dtype == dtype
            assert float((g.double() - r).norm() / r.norm()) <= max(tol, 1e-4 if dtype == torch.float32 else tol)


# --------------------------------------------------------------------------- #
# linear cross-entropy kernels
# --------------------------------------------------------------------------- #
def _lce(seed, **kw):
    from test_linear_ce import _make

    return _make("cpp", seed, **kw)


def _lce_check(case, **kw):
    from test_linear_ce import _check

    return _check("cpp", case, **kw)


@needs_cpp
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_linear_ce_dtypes(soft, dtype):
    tol = dict(rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL) if dtype == torch.bfloat16 else \
        dict(rtol=1e-10, atol=1e-12, grtol=1e-10)
    for k, reduction in enumerate(("mean", "sum", "none")):
        _lce_check(_lce(1500 + k, soft=soft, reduction=reduction, scale_kind="rows", bias=True, N=37, H=24, K=301,
                        ignore_frac=0.2, dtype=dtype), **tol)


@needs_cpp
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("soft", [False, True])
def test_linear_ce_many_blocks(monkeypatch, threads, soft, nthreads):
    """7 rows per chunk (ragged last chunk), row-parallel fused pass."""
    import importlib

    mod = importlib.import_module("scale_fast.backends.cpp.linear_ce")
    monkeypatch.setattr(mod, "CHUNK_BYTES", 7 * 101 * 4)
    threads(nthreads)
    for k, reduction in enumerate(("mean", "sum", "none")):
        for scale_kind in (None, "rows"):
            _lce_check(_lce(1600 + k, soft=soft, reduction=reduction, scale_kind=scale_kind, bias=True, N=53, H=33,
                            K=101, ignore_frac=0.25))


@needs_cpp
def test_linear_ce_large_logits_and_odd_sizes():
    """Logits in the hundreds (no overflow: the row max is the shift) and K not a multiple of 8."""
    case = _lce(1700, soft=False, reduction="mean", scale_kind="float", bias=True, N=65, H=7, K=1003)
    case["hidden"] = case["hidden"] * 40
    _lce_check(case)


@needs_cpp
def test_linear_ce_retained_graph_recomputes(monkeypatch):
    """The eager gradients are handed to autograd once; a second backward recomputes them."""
    case = _lce(1800, soft=True, reduction="mean", scale_kind="rows", bias=True, N=20, H=16, K=50)
    h = case["hidden"].float().requires_grad_()
    W = case["weight"].float().requires_grad_()
    q = case["target"].float().requires_grad_()
    out = sf.linear_cross_entropy(h, W, q, scale=case["scale"].float(), backend="cpp")
    g1 = torch.autograd.grad(out, [h, W, q], retain_graph=True)
    g2 = torch.autograd.grad(3 * out, [h, W, q])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(3 * a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# scores (per-sample Gram in C++)
# --------------------------------------------------------------------------- #
@needs_cpp
@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_scores_op(mode, dtype):
    """The cpp scores op against the float64 reference: NaN in absent rows, rows below the 1e-12 clamp, B=1."""
    from conftest import assert_grad_close, assert_rows_zero_grad, assert_value_close, case_rng, make_embeddings, \
        make_present, ref_leaf
    from reference import ref_scores

    from scale_fast.backends.cpp import scores as cpp_scores

    tol = LOW_RTOL if dtype == torch.bfloat16 else (1e-10 if dtype == torch.float64 else 1e-5)
    for seed, (M, B, D) in enumerate([(5, 300, 33), (3, 1, 7), (4, 64, 16)]):
        present = make_present(case_rng("cpp-scores", seed), M, B, "random" if B > 1 else "all")
        e = make_embeddings(torch_gen(1900 + seed), present, D, fill="nan")
        if seed == 2:
            e[0, 0] = 1e-14 * e[0, 0].nan_to_num(0.0)   # a present row below the clamp
            present[0, 0] = True
        e_lib = e.to(dtype).requires_grad_()
        S, Sp, act = cpp_scores(e_lib, present, mode)
        e_ref = ref_leaf(e.to(dtype))
        S_r, Sp_r, act_r = ref_scores(e_ref, present, mode)
        assert torch.equal(act, act_r)
        assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_value_close(S, S_r, tol, tol, "S")
        assert_value_close(Sp, Sp_r, tol, tol, "S_prime")
        gen = torch_gen(7)
        GS, GP = torch.randn(S_r.shape, generator=gen, dtype=torch.float64), \
            torch.randn(Sp_r.shape, generator=gen, dtype=torch.float64)
        (g_ref,) = torch.autograd.grad((S_r * GS).sum() + (Sp_r * GP).sum(), [e_ref])
        (g,) = torch.autograd.grad((S * GS.to(S)).sum() + (Sp * GP.to(Sp)).sum(), [e_lib])
        assert g.dtype == dtype
        assert_grad_close(g, g_ref, max(tol, 1e-4) if dtype == torch.float32 else tol, name="d embeddings")
        assert_rows_zero_grad(g, present)
