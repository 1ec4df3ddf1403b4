"""linear_cross_entropy (docs/contract.md §7) against the float64 reference and F.cross_entropy, every backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scale_fast as sf
from conftest import (BACKENDS, DEVICE, GRAD_RTOL, LOW_RTOL, assert_grad_close, assert_value_close, backend_cases,
                      case_rng, dev_leaf, grads, is_slow, ref_leaf, torch_gen)
from reference import ref_linear_cross_entropy

REDUCTIONS = ("mean", "sum", "none")
SCALE_KINDS = (None, "float", "0dim", "rows")


def _shapes(backend, rng):
    if is_slow(backend):
        return rng.choice([1, 2, 5, 13, 24]), rng.choice([7, 16, 33, 40]), rng.choice([3, 17, 64, 70])
    return (rng.choice([1, 2, 7, 64, 129, 300]), rng.choice([7, 33, 65, 128]),
            rng.choice([5, 100, 1000, 4099]))


def _make(backend, seed, *, soft=None, reduction=None, scale_kind="rand", bias=None, N=None, H=None, K=None,
          ignore_frac=None, ignore_index=None, dtype=torch.float32):
    rng = case_rng("lce", backend, seed)
    n0, h0, k0 = _shapes(backend, rng)
    N = n0 if N is None else N
    H = h0 if H is None else H
    K = k0 if K is None else K
    soft = (seed % 2 == 1) if soft is None else soft
    reduction = REDUCTIONS[(seed // 2) % 3] if reduction is None else reduction
    scale_kind = SCALE_KINDS[(seed // 6) % 4] if scale_kind == "rand" else scale_kind
    bias = rng.random() < 0.5 if bias is None else bias
    ignore_index = rng.choice([-100, -1, K + 3]) if ignore_index is None else ignore_index
    gen = torch_gen(3000 + seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(K, H, generator=gen, dtype=torch.float64) / H ** 0.5
    b = torch.randn(K, generator=gen, dtype=torch.float64) if bias else None
    if soft:
        target = torch.softmax(2 * torch.randn(N, K, generator=gen, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, K, (N,), generator=gen)
        frac = rng.choice([0.0, 0.3]) if ignore_frac is None else ignore_frac
        drop = torch.rand(N, generator=gen) < frac
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    if scale_kind is None:
        scale = None
    elif scale_kind == "float":
        scale = rng.choice([0.5, 1 / 0.07, 2.0])
    elif scale_kind == "0dim":
        scale = torch.tensor(rng.uniform(0.3, 3.0), dtype=torch.float64)
    else:
        scale = torch.rand(N, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    cast = (lambda x: x.to(dtype)) if dtype != torch.float64 else (lambda x: x)
    case = dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b) if b is not None else None,
                target=cast(target) if soft else target,
                scale=cast(scale) if isinstance(scale, torch.Tensor) else scale,
                ignore_index=ignore_index, reduction=reduction)
    return case


def _check(backend, case, *, rtol=1e-5, atol=1e-6, grtol=1e-4, target_grad=True):
    names = ["hidden", "weight", "bias", "scale", "target"]
    lib = {k: (dev_leaf(case[k], requires_grad=(k != "target" or target_grad))
               if isinstance(case[k], torch.Tensor) else case[k]) for k in names}
    ref = {k: (ref_leaf(case[k], requires_grad=(k != "target" or target_grad))
               if isinstance(case[k], torch.Tensor) else case[k]) for k in names}
    out = sf.linear_cross_entropy(lib["hidden"], lib["weight"], lib["target"], lib["bias"],
                                  ignore_index=case["ignore_index"], scale=lib["scale"],
                                  reduction=case["reduction"], backend=backend)
    want = ref_linear_cross_entropy(ref["hidden"], ref["weight"], ref["target"], ref["bias"],
                                    case["ignore_index"], ref["scale"], case["reduction"])
    in_dtype = case["hidden"].dtype
    assert out.dtype == (torch.float64 if in_dtype == torch.float64 else torch.float32), out.dtype
    assert_value_close(out, want, rtol, atol, "loss")

    # the documented formula, in float64, as a second independent check
    if case["reduction"] != "mean" or case["target"].is_floating_point() or \
            bool((case["target"] != case["ignore_index"]).any()):
        logits = ref["hidden"].detach() @ ref["weight"].detach().T
        if ref["bias"] is not None:
            logits = logits + ref["bias"].detach()
        s = ref["scale"]
        if isinstance(s, torch.Tensor):
            s = s.detach()
            logits = (s[:, None] if s.dim() == 1 else s) * logits
        elif s is not None:
            logits = s * logits
        t = ref["target"].detach() if ref["target"].is_floating_point() else ref["target"]
        if t.is_floating_point():  # F.cross_entropy takes no ignore_index with probability targets
            f = F.cross_entropy(logits, t, reduction=case["reduction"])
        else:
            f = F.cross_entropy(logits, t, ignore_index=case["ignore_index"], reduction=case["reduction"])
        assert_value_close(out, f, rtol, atol, "loss vs F.cross_entropy")

    G = torch.randn(want.shape, generator=torch_gen(1), dtype=torch.float64)
    trip = [(k, lib[k], ref[k]) for k in names
            if isinstance(lib[k], torch.Tensor) and lib[k].requires_grad]
    g_ref = grads((want * G).sum(), [t[2] for t in trip])
    g_lib = grads((out * G.to(out.dtype).to(DEVICE)).sum(), [t[1] for t in trip])
    for (name, l_leaf, r_leaf), gl, gr in zip(trip, g_lib, g_ref):
        assert_grad_close(gl, gr if gr is not None else torch.zeros_like(r_leaf), grtol, name=f"d {name}")
        if gl is not None:
            assert gl.dtype == l_leaf.dtype, f"d {name} dtype"
    return out


@pytest.mark.parametrize("backend,seed", backend_cases(48, 10))
def test_linear_cross_entropy_matches_reference(backend, seed):
    _check(backend, _make(backend, seed))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_reduction_and_target_kind(backend, soft, reduction):
    _check(backend, _make(backend, 77, soft=soft, reduction=reduction, scale_kind="rows", bias=True))


@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_scale_kind(backend, scale_kind):
    _check(backend, _make(backend, 78, soft=False, reduction="mean", scale_kind=scale_kind, ignore_frac=0.3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored(backend, reduction):
    """'mean' with every row ignored is 0, not NaN (documented deviation); grads exactly 0."""
    case = _make(backend, 79, soft=False, reduction=reduction, ignore_frac=1.0, N=6, H=7, K=11, bias=True)
    out = _check(backend, case)
    assert torch.isfinite(out).all()
    assert (out.detach().cpu() == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    for soft in (False, True):
        out = _check(backend, _make(backend, 80, soft=soft, reduction="mean", N=1, ignore_frac=0.0))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_odd_sizes(backend):
    N, H, K = (24, 33, 70) if is_slow(backend) else (257, 65, 8191)
    _check(backend, _make(backend, 81, soft=False, reduction="mean", scale_kind="rows", bias=True, N=N, H=H, K=K,
                          ignore_frac=0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_are_stable(backend):
    """Large logits (|logit| ~ 1e3): log-sum-exp must not overflow."""
    case = _make(backend, 82, soft=False, reduction="sum", scale_kind="float", N=9, H=16, K=37, ignore_frac=0.0)
    case["scale"] = 300.0
    _check(backend, case, rtol=1e-5, atol=1e-3, grtol=1e-3)


@pytest.mark.parametrize("soft", [False, True])
def test_bfloat16_inputs(soft):
    case = _make("torch", 83, soft=soft, reduction="mean", scale_kind="rows", bias=True, N=64, H=33, K=1000,
                 dtype=torch.bfloat16)
    _check("torch", case, rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_backends(backend):
    case = _make(backend, 84, soft=False, reduction="mean", scale_kind=None, bias=True, N=12, H=16, K=40,
                 dtype=torch.bfloat16)
    _check(backend, case, rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL)


def test_float64_inputs():
    case = _make("torch", 85, soft=False, reduction="mean", scale_kind="rows", bias=True, N=40, H=9, K=300,
                 dtype=torch.float64)
    _check("torch", case, rtol=1e-10, atol=1e-12, grtol=1e-9)


def test_empty_input():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    out = sf.linear_cross_entropy(hidden, weight, target, backend="torch")
    assert out.item() == 0.0
    out = sf.linear_cross_entropy(hidden, weight, target, reduction="none", backend="torch")
    assert out.shape == (0,)


def test_gradcheck_torch_backend():
    gen = torch_gen(86)
    h = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    sc = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.tensor([0, 3, -100, 6, 2])
    q = torch.softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64), -1).requires_grad_()
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda h, w, b, sc: sf.linear_cross_entropy(h, w, t, b, scale=sc, reduction=red, backend="torch"),
            (h, w, b, sc))
        assert torch.autograd.gradcheck(
            lambda h, w, b, sc, q: sf.linear_cross_entropy(h, w, q, b, scale=sc, reduction=red, backend="torch"),
            (h, w, b, sc, q))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_retained_graph(backend, reduction):
    """loss.backward(retain_graph=True) twice accumulates exactly twice the reference gradient."""
    case = _make(backend, 87, soft=False, reduction=reduction, scale_kind=None, bias=True, N=10, H=16, K=37,
                 ignore_frac=0.2)
    h, W, b = dev_leaf(case["hidden"]), dev_leaf(case["weight"]), dev_leaf(case["bias"])
    out = sf.linear_cross_entropy(h, W, case["target"].to(DEVICE), b, ignore_index=case["ignore_index"],
                                  reduction=reduction, backend=backend)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    hr, Wr, br = ref_leaf(case["hidden"]), ref_leaf(case["weight"]), ref_leaf(case["bias"])
    want = ref_linear_cross_entropy(hr, Wr, case["target"], br, case["ignore_index"], None, reduction)
    gh, gW, gb = torch.autograd.grad(2 * want.sum(), [hr, Wr, br])
    assert_grad_close(h.grad, gh, name="d hidden")
    assert_grad_close(W.grad, gW, name="d weight")
    assert_grad_close(b.grad, gb, name="d bias")


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_many_small_chunks(monkeypatch, backend, soft):
    """The shared chunk loop with tiny chunks (ragged last chunk), every reduction and gradient."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} not available")
    import scale_fast.backends._lce_driver as driver

    monkeypatch.setattr(driver, "HOST_CHUNK_BYTES", 7 * 101 * 4)  # torch: 4 rows per chunk (a power of two)
    monkeypatch.setattr(driver, "HOST_MIN_ROWS", 1)
    monkeypatch.setenv("SCALE_FAST_LCE_CHUNK_MB", str(5 * 101 * 4 / 2 ** 20))  # triton: 4 rows per chunk
    if backend == "triton":
        monkeypatch.setattr("scale_fast.backends.triton.linear_ce.MIN_ROWS", 1)
    N, H, K = (23, 16, 101) if is_slow(backend) else (53, 33, 101)
    if backend == "triton":
        from scale_fast.backends.triton.linear_ce import ENGINE as engine
    else:
        engine = driver.host_engine(None)
    rows = engine.rows_per_chunk(N, K, H, torch.device("cpu"))
    assert rows == 4 and N % rows  # several chunks, the last one ragged
    for reduction in REDUCTIONS:
        _check(backend, _make(backend, 88, soft=soft, reduction=reduction, scale_kind="rows", bias=True, N=N, H=H,
                              K=K, ignore_frac=0.25))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpp")])
def test_unit_grad_output_several_chunks(monkeypatch, backend, reduction):
    """loss.backward() (grad_output exactly 1: the CPU skips the multiplication) over several chunks,
    the first writing d weight and the rest adding to it, ignored rows skipped."""
    import scale_fast.backends._lce_driver as driver

    monkeypatch.setattr(driver, "HOST_CHUNK_BYTES", 7 * 101 * 4)  # 4 rows per chunk
    monkeypatch.setattr(driver, "HOST_MIN_ROWS", 1)
    case = _make(backend, 89, soft=False, reduction=reduction, scale_kind=None, bias=True, N=19, H=12, K=101,
                 ignore_frac=0.3)
    h, W, b = dev_leaf(case["hidden"]), dev_leaf(case["weight"]), dev_leaf(case["bias"])
    sf.linear_cross_entropy(h, W, case["target"].to(DEVICE), b, ignore_index=case["ignore_index"],
                            reduction=reduction, backend=backend).backward()
    hr, Wr, br = ref_leaf(case["hidden"]), ref_leaf(case["weight"]), ref_leaf(case["bias"])
    want = ref_linear_cross_entropy(hr, Wr, case["target"], br, case["ignore_index"], None, reduction)
    gh, gW, gb = torch.autograd.grad(want, [hr, Wr, br])
    assert_grad_close(h.grad, gh, name="d hidden")
    assert_grad_close(W.grad, gW, name="d weight")
    assert_grad_close(b.grad, gb, name="d bias")


def test_chunk_rows_rule():
    """Liger's chunk size (power of two at or above N / ceil(K / H)), halved to fit the byte cap, at
    least min_rows, at most N."""
    from scale_fast.backends._lce_driver import chunk_rows

    assert chunk_rows(8192, 21128, 768, 1 << 40) == 512
    assert chunk_rows(16384, 21128, 768, 48 * 2 ** 20) == 512
    assert chunk_rows(16384, 21128, 768, 32 * 2 ** 20) == 256
    assert chunk_rows(5, 1000, 7, 1 << 40) == 1
    assert chunk_rows(3, 2, 64, 1 << 40) == 3  # never more than N
    # a large vocabulary: neither Liger's rule (16 rows here) nor the cap goes under min_rows
    assert chunk_rows(2048, 151936, 768, 48 * 2 ** 20) == 16
    assert chunk_rows(2048, 151936, 768, 48 * 2 ** 20, min_rows=128) == 128
    assert chunk_rows(65536, 151936, 768, 48 * 2 ** 20, min_rows=512) == 512
    assert chunk_rows(65536, 151936, 768, 48 * 2 ** 20, min_rows=128) == 128
    assert chunk_rows(100, 151936, 768, 48 * 2 ** 20, min_rows=128) == 100
    assert chunk_rows(16384, 21128, 768, 48 * 2 ** 20, min_rows=128) == 512  # the floor does not bind


@pytest.mark.parametrize("mode", ["fp32", "input"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_accumulation_dtype(monkeypatch, backend, mode):
    """SCALE_FAST_LCE_WEIGHT_GRAD: d weight accumulated in float32 (default) or the weight's dtype."""
    monkeypatch.setenv("SCALE_FAST_LCE_WEIGHT_GRAD", mode)
    monkeypatch.setenv("SCALE_FAST_LCE_CHUNK_MB", str(4 * 40 * 4 / 2 ** 20))  # triton: 4 rows per chunk
    if backend == "triton":
        monkeypatch.setattr("scale_fast.backends.triton.linear_ce.MIN_ROWS", 1)
    for dtype in (torch.bfloat16, torch.float32):
        case = _make(backend, 92, soft=False, reduction="mean", scale_kind="rows", bias=True, N=12, H=16, K=40,
                     ignore_frac=0.2, dtype=dtype)
        tol = LOW_RTOL if dtype == torch.bfloat16 else GRAD_RTOL
        _check(backend, case, rtol=tol if dtype == torch.bfloat16 else 1e-5,
               atol=tol if dtype == torch.bfloat16 else 1e-6, grtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_input_needs_grad(backend):
    """Inputs without requires_grad: loss only, equal to the reference."""
    case = _make(backend, 93, soft=False, reduction="sum", scale_kind="rows", bias=True, N=9, H=16, K=37,
                 ignore_frac=0.3)
    out = sf.linear_cross_entropy(case["hidden"].to(DEVICE), case["weight"].to(DEVICE), case["target"].to(DEVICE),
                                  case["bias"].to(DEVICE), scale=case["scale"].to(DEVICE),
                                  ignore_index=case["ignore_index"], reduction="sum", backend=backend)
    want = ref_linear_cross_entropy(case["hidden"].double(), case["weight"].double(), case["target"],
                                    case["bias"].double(), case["ignore_index"], case["scale"].double(), "sum")
    assert not out.requires_grad
    assert_value_close(out, want, name="loss (no gradients)")


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, soft):
    """hidden, weight and soft targets given as transposed / strided views."""
    case = _make(backend, 90, soft=soft, reduction="sum", scale_kind="rows", bias=True, N=19, H=16, K=33,
                 ignore_frac=0.2)
    h_base = case["hidden"].T.contiguous().to(DEVICE).requires_grad_()       # [H, N]
    W_base = torch.zeros(case["weight"].shape[0], 2 * case["weight"].shape[1], dtype=torch.float32)
    W_base[:, ::2] = case["weight"]
    W_base = W_base.to(DEVICE).requires_grad_()
    h_view, W_view = h_base.T, W_base[:, ::2]
    target = case["target"].to(DEVICE)
    if soft:
        target = target.T.contiguous().T
    assert not h_view.is_contiguous() and not W_view.is_contiguous()
    out = sf.linear_cross_entropy(h_view, W_view, target, case["bias"].to(DEVICE), scale=case["scale"].to(DEVICE),
                                  ignore_index=case["ignore_index"], reduction="sum", backend=backend)
    hr, Wr = ref_leaf(case["hidden"]), ref_leaf(case["weight"])
    want = ref_linear_cross_entropy(hr, Wr, ref_leaf(case["target"], False), case["bias"].double(),
                                    case["ignore_index"], case["scale"].double(), "sum")
    assert_value_close(out, want, name="loss (strided inputs)")
    gh, gW = torch.autograd.grad(out, [h_base, W_base])
    gh_r, gW_r = torch.autograd.grad(want, [hr, Wr])
    assert_grad_close(gh.T, gh_r, name="d hidden")
    assert_grad_close(gW[:, ::2], gW_r, name="d weight")
    assert (gW[:, 1::2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, dtype):
    for soft in (False, True):
        case = _make(backend, 91, soft=soft, reduction="mean", scale_kind="rows", bias=True, N=12, H=16, K=40,
                     dtype=dtype)
        _check(backend, case, rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_scale_keeps_float64_exact(backend):
    """A Python float `scale` with float64 inputs is applied in float64 (not rounded to float32 first)."""
    gen = torch.Generator().manual_seed(83)
    h = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (9,), generator=gen)
    s = 1 / 3  # not a float32 number
    out = sf.linear_cross_entropy(h, w, t, scale=s, backend=backend)
    ref = torch.nn.functional.cross_entropy(s * (h @ w.T), t)
    assert out.dtype == torch.float64
    assert abs(out.item() - ref.item()) <= 1e-14 * abs(ref.item())
    (g,) = torch.autograd.grad(out, [h])
    (g_ref,) = torch.autograd.grad(ref, [h])
    assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-15)
