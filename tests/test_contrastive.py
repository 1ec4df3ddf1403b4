"""multi_pair_info_nce (docs/contract.md §4) against the float64 reference, every backend."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import scale_fast as sf
from conftest import (BACKENDS, DEVICE, LOW_RTOL, PATTERNS, assert_grad_close, assert_rows_zero_grad,
                      assert_value_close, backend_cases, case_rng, dev_leaf, grads, is_slow, make_aligned,
                      make_embeddings, make_present, ref_leaf, sizes, torch_gen)
from reference import ref_active, ref_pair_losses, ref_scale_loss

FORMS = ("ntxent", "clip")
WEIGHT_KINDS = (None, "MM", "BMM")


def _weights(gen, kind, M, B):
    if kind is None:
        return None
    shape = (M, M) if kind == "MM" else (B, M, M)
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2.0 - 0.5  # in [-0.5, 1.5)


def _run_case(backend, seed, *, M=None, B=None, D=None, pattern=None, form=None, wkind="rand",
              scale_kind=None, dtype=torch.float32, rtol=None, grtol=None):
    rng = case_rng("mpnce", backend, seed)
    M = M if M is not None else rng.randint(2, 5)
    B, D = sizes(backend, rng, B=B, D=D)
    pattern = pattern if pattern is not None else rng.choice(PATTERNS)
    form = form if form is not None else FORMS[seed % 2]
    wkind = WEIGHT_KINDS[(seed // 2) % 3] if wkind == "rand" else wkind
    scale_kind = scale_kind if scale_kind is not None else rng.choice(["float", "tensor", "default"])
    present = make_present(rng, M, B, pattern)
    gen = torch_gen(5000 + seed)
    e = make_embeddings(gen, present, D, fill=rng.choice(["nan", "zero", "big"]), dtype=dtype)
    w = _weights(gen, wkind, M, B)
    s_val = rng.choice([1 / 0.07, 1.0, 3.7, 50.0])

    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # dtype of weights / scale
    e_dev = dev_leaf(e)
    w_dev = dev_leaf(w.to(pdt)) if w is not None else None
    kwargs = dict(weights=w_dev, form=form, backend=backend)
    s_dev = None
    if scale_kind == "float":
        kwargs["logit_scale"] = s_val
    elif scale_kind == "tensor":
        s_dev = torch.tensor(s_val, dtype=pdt, device=DEVICE, requires_grad=True)
        kwargs["logit_scale"] = s_dev
    else:
        s_val = 1 / 0.07
    out = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), **kwargs)

    e_ref = ref_leaf(e)
    w_ref = ref_leaf(w.to(pdt)) if w is not None else None
    s_ref = ref_leaf(s_dev) if s_dev is not None else s_val
    ref = ref_pair_losses(e_ref, present, s_ref, w_ref, form)

    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want_dtype, f"loss dtype {out.dtype}"
    assert out.shape == (M, M)
    rt = rtol if rtol is not None else 1e-5
    # float32 logits carry an absolute rounding error ~ ulp(s * |w|): losses near 0 need that much slack
    wmax = float(w.abs().max()) if w is not None else 1.0
    at = max(1e-6, 2e-7 * s_val * wmax) if rtol is None else rt
    assert_value_close(out, ref, rt, at, "pair losses")
    # zeros outside the active upper triangle, exactly
    act = ref_active(present)
    upper = torch.triu(torch.ones(M, M, dtype=torch.bool), 1)
    off = ~(upper & act)
    assert (out.detach().cpu()[off] == 0).all(), f"nonzero entries outside active upper triangle: {out}"

    G = torch.randn(M, M, generator=gen, dtype=torch.float64)
    triples = [("embeddings", e_dev, e_ref)]
    if w_dev is not None:
        triples.append(("weights", w_dev, w_ref))
    if s_dev is not None:
        triples.append(("logit_scale", s_dev, s_ref))
    g_ref = grads((ref * G).sum(), [t[2] for t in triples])
    g_lib = grads((out * G.to(out.dtype).to(DEVICE)).sum(), [t[1] for t in triples])
    gt = grtol if grtol is not None else 1e-4
    for (name, l_leaf, r_leaf), gl, gr in zip(triples, g_lib, g_ref):
        gr = gr if gr is not None else torch.zeros_like(r_leaf)
        assert_grad_close(gl, gr, gt, name=f"d {name}")
        if gl is not None:
            assert gl.dtype == l_leaf.dtype, f"d {name} dtype {gl.dtype} != {l_leaf.dtype}"
    assert_rows_zero_grad(g_lib[0], present)
    if g_lib[0] is not None:
        assert g_lib[0].dtype == dtype, f"d embeddings dtype {g_lib[0].dtype} != {dtype}"
    return out


@pytest.mark.parametrize("backend,seed", backend_cases(48, 6))
def test_multi_pair_info_nce_matches_reference(backend, seed):
    _run_case(backend, seed)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_with_single_common_sample(backend, form):
    """n = 1 pairs (and a modality present once): finite, zero-loss for ntxent, exact grads."""
    _run_case(backend, 101, M=4, pattern="n1", form=form, wkind="BMM", scale_kind="tensor")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one(backend, form):
    out = _run_case(backend, 202, M=3, B=1, D=7, pattern="all", form=form, wkind=None, scale_kind="tensor")
    assert torch.isfinite(out).all()
    # one sample: every row's only candidate is its positive, so every pair loss is exactly log(1) = 0
    assert_value_close(out, torch.zeros(3, 3, dtype=torch.float64), name="B=1 losses")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_modality_absent_everywhere(backend, form):
    M = 4 if is_slow(backend) else 5
    out = _run_case(backend, 303, M=M, pattern="absent_modality", form=form, wkind="MM", scale_kind="float")
    assert out.shape == (M, M)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch_and_odd_dim(backend):
    B = 24 if is_slow(backend) else 300
    _run_case(backend, 404, M=3, B=B, D=33 if is_slow(backend) else 65, pattern="random", form="ntxent",
              wkind="BMM", scale_kind="tensor")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_pair(backend, form):
    """Every pair inactive: all entries exactly 0, no NaN."""
    present = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    e = make_embeddings(torch_gen(9), present, 7)
    out = sf.multi_pair_info_nce(dev_leaf(e), present.to(DEVICE), form=form, backend=backend)
    assert out.shape == (3, 3)
    assert (out.detach().cpu() == 0).all()


@pytest.mark.parametrize("form", FORMS)
def test_bfloat16_inputs(form):
    _run_case("torch", 505, M=3, B=40, D=33, pattern="random", form=form, wkind="BMM", scale_kind="tensor",
              dtype=torch.bfloat16, rtol=LOW_RTOL, grtol=LOW_RTOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_backends(backend, form):
    """Low-precision inputs on every backend (returns float32)."""
    _run_case(backend, 506, M=3, B=9, D=16, pattern="random", form=form, wkind=None, scale_kind="float",
              dtype=torch.bfloat16, rtol=LOW_RTOL, grtol=LOW_RTOL)


@pytest.mark.parametrize("form", FORMS)
def test_float64_inputs(form):
    _run_case("torch", 606, M=4, B=21, D=9, pattern="mixed", form=form, wkind="BMM", scale_kind="tensor",
              dtype=torch.float64, rtol=1e-9, grtol=1e-8)


def _openclip_loss(a, b, s):
    """OpenCLIP ClipLoss on normalized features (written out; s already exponentiated)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    logits = s * a @ b.T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("backend,seed", backend_cases(3, 1))
def test_clip_form_equals_openclip(backend, seed):
    B, D = (12, 16) if is_slow(backend) else (97, 65)
    gen = torch_gen(700 + seed)
    a = torch.randn(B, D, generator=gen)
    b = torch.randn(B, D, generator=gen)
    s = [1 / 0.07, 2.5, 100.0][seed]
    e_dev = dev_leaf(torch.stack([a, b]))
    s_dev = torch.tensor(s, device=DEVICE, requires_grad=True)
    a64, b64 = ref_leaf(a), ref_leaf(b)
    s64 = torch.tensor(s_dev.item(), dtype=torch.float64, requires_grad=True)
    want = _openclip_loss(a64, b64, s64)
    ga, gb, gs = torch.autograd.grad(want, [a64, b64, s64])

    pair = sf.multi_pair_info_nce(e_dev, logit_scale=s_dev, form="clip", backend=backend)
    assert_value_close(pair[0, 1], want, name="multi_pair_info_nce clip vs OpenCLIP")
    out = sf.scale_loss(e_dev, logit_scale=s_dev, form="clip", harmonize=False, backend=backend)
    assert_value_close(out.total, want, name="scale_loss clip vs OpenCLIP")
    ge, gsl = torch.autograd.grad(out.total, [e_dev, s_dev])
    assert_grad_close(ge, torch.stack([ga, gb]), name="d embeddings")
    assert_grad_close(gsl, gs, name="d logit_scale")


# (mode, form, B, absent (modality, sample) entries): tiny batches of five modalities
_SCALE_GRAD_CASES = (("batch", "clip", 2, ()), ("batch", "ntxent", 2, ()), ("sample", "clip", 2, ()),
                     ("sample", "ntxent", 3, ((4, 0), (1, 2))), ("batch", "clip", 3, ((0, 1),)),
                     ("batch", "ntxent", 3, ((2, 0), (3, 0))))


def _d_logit_scale(e, present, mode, form, dtype, device="cpu", backend=None):
    """d total / d logit_scale of scale_loss (backend) or of the reference (None), in dtype."""
    x, p = e.to(device=device, dtype=dtype), present.to(device)
    s = torch.tensor(1 / 0.07, dtype=dtype, device=device, requires_grad=True)
    if backend is None:
        total = ref_scale_loss(x, p, s, mode=mode, form=form)["total"]
    else:
        total = sf.scale_loss(x, p, logit_scale=s, mode=mode, form=form, backend=backend).total
    return float(torch.autograd.grad(total, [s])[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_gradient_float32_at_tiny_batch(backend):
    """d logit_scale in float32 where it is a small difference: modalities of a sample nearly aligned
    (as after training), so every positive's softmax probability is close to 1.  Formed as
    sum_c P G - G_pos it loses the digits the two share (relative errors of 1e-5 to 1e-4, as a float32
    autograd run of the same loss); formed from P (G - G_pos) products it keeps them: within 4e-6 of
    float64 in every case, and 4x more accurate than float32 autograd on the whole."""
    cases = _SCALE_GRAD_CASES[:3] + _SCALE_GRAD_CASES[4:5] if is_slow(backend) else _SCALE_GRAD_CASES
    seeds = 1 if is_slow(backend) else 4
    err, err_autograd = [], []
    for k, (mode, form, B, absent) in enumerate(cases):
        for seed in range(seeds):
            present, e = make_aligned(torch_gen(9100 + 10 * k + seed), B, absent)
            want = _d_logit_scale(e, present, mode, form, torch.float64)
            got = _d_logit_scale(e, present, mode, form, torch.float32, DEVICE, backend)
            err.append(abs(got - want) / abs(want))
            err_autograd.append(abs(_d_logit_scale(e, present, mode, form, torch.float32) - want) / abs(want))
    assert max(err) <= 4e-6, f"d logit_scale relative errors {err} (float32 autograd: {err_autograd})"
    assert sum(err) <= 0.25 * sum(err_autograd), f"d logit_scale relative errors {err} vs autograd {err_autograd}"


def _simclr_loss(a, b, s):
    """NT-Xent of SimCLR (2n rows, self excluded) written with F.cross_entropy."""
    n = a.shape[0]
    u = torch.cat([a, b]) / torch.cat([a, b]).norm(dim=-1, keepdim=True)
    logits = s * u @ u.T
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_equals_simclr(backend):
    B, D = (10, 16) if is_slow(backend) else (64, 33)
    gen = torch_gen(808)
    a = torch.randn(B, D, generator=gen)
    b = torch.randn(B, D, generator=gen)
    pair = sf.multi_pair_info_nce(torch.stack([a, b]).to(DEVICE), logit_scale=1 / 0.07, backend=backend)
    want = _simclr_loss(a.double(), b.double(), 1 / 0.07)
    assert_value_close(pair[0, 1], want, name="ntxent vs SimCLR")


def test_gradcheck_torch_backend():
    present = torch.tensor([[True, True, False, True], [True, True, True, False], [False, True, True, True]])
    gen = torch_gen(909)
    e = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, 3, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    for form in FORMS:
        def f(e, w, s):
            return sf.multi_pair_info_nce(e, present, logit_scale=s, weights=w, form=form, backend="torch")
        assert torch.autograd.gradcheck(f, (e, w, s), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_present_default_all_true():
    gen = torch_gen(111)
    e = torch.randn(3, 20, 9, generator=gen)
    a = sf.multi_pair_info_nce(e.to(DEVICE))
    b = sf.multi_pair_info_nce(e.to(DEVICE), torch.ones(3, 20, dtype=torch.bool, device=DEVICE))
    ref = ref_pair_losses(e.double(), None, 1 / 0.07, None, "ntxent")
    assert_value_close(a, ref, name="present=None")
    assert_value_close(b, ref, name="present=all True")


def test_list_of_tensors_input():
    gen = torch_gen(112)
    e = torch.randn(4, 15, 7, generator=gen)
    leaves = [dev_leaf(e[m]) for m in range(4)]
    out = sf.multi_pair_info_nce(leaves, form="clip")
    e_ref = ref_leaf(e)
    ref = ref_pair_losses(e_ref, None, 1 / 0.07, None, "clip")
    assert_value_close(out, ref, name="list input")
    gl = torch.autograd.grad(out.sum(), leaves)
    (gr,) = torch.autograd.grad(ref.sum(), [e_ref])
    assert_grad_close(torch.stack(gl), gr, name="d list embeddings")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(3))
def test_torch_backend_multiple_tiles(monkeypatch, form, seed):
    """The torch backend's tiling (normally 1024 rows) with tiny tiles: tile edges, ragged last tile."""
    mod = importlib.import_module("scale_fast.backends.torch.contrastive")
    assert hasattr(mod, "TILE"), "torch backend tile size knob renamed: update this test"
    monkeypatch.setattr(mod, "TILE", 16)
    _run_case("torch", 900 + seed, M=3, B=[17, 50, 101][seed], D=33, pattern=["random", "mixed", "all"][seed],
              form=form, wkind=("BMM", "MM", None)[seed], scale_kind=("tensor", "float", "tensor")[seed])


@pytest.mark.parametrize("form", FORMS)
def test_torch_backend_online_max_path(form):
    """|s * w| large (> 30): the torch backend switches from a fixed shift to an online max."""
    _run_case("torch", 950, M=3, B=70, D=16, pattern="random", form=form, wkind="BMM", scale_kind="tensor")
    _run_case("torch", 951, M=2, B=33, D=16, pattern="all", form=form, wkind=None, scale_kind="float")


@pytest.mark.parametrize("backend,seed", backend_cases(2, 1))
def test_large_logit_scale(backend, seed):
    """logit_scale = 100 (OpenCLIP's clamp) with weights up to 1.5: logits ~ 150, no overflow."""
    rng_scale = 100.0
    gen = torch_gen(960 + seed)
    B, D = (12, 16) if is_slow(backend) else (90, 33)
    present = make_present(case_rng("big-s", seed), 3, B, "random")
    e = make_embeddings(gen, present, D)
    w = torch.rand(B, 3, 3, generator=gen) + 0.5
    e_dev, w_dev = dev_leaf(e), dev_leaf(w)
    s_dev = torch.tensor(rng_scale, device=DEVICE, requires_grad=True)
    for form in FORMS:
        out = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), logit_scale=s_dev, weights=w_dev, form=form,
                                     backend=backend)
        e_r, w_r, s_r = ref_leaf(e), ref_leaf(w), ref_leaf(s_dev)
        ref = ref_pair_losses(e_r, present, s_r, w_r, form)
        assert_value_close(out, ref, 1e-5, 2e-7 * 150, f"{form} losses at s=100")
        g_lib = torch.autograd.grad(out.sum(), [e_dev, w_dev, s_dev])
        g_ref = torch.autograd.grad(ref.sum(), [e_r, w_r, s_r])
        for name, a, b in zip(("embeddings", "weights", "logit_scale"), g_lib, g_ref):
            assert_grad_close(a, b, name=f"{form} d {name}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, form):
    """Strided views (a [B, M, D] tensor transposed, every other feature, present transposed) work."""
    B, D = (11, 9) if is_slow(backend) else (57, 33)
    present = make_present(case_rng("nc", backend, form), 3, B, "random")
    gen = torch_gen(970)
    e = make_embeddings(gen, present, D)
    base = torch.randn(B, 3, 2 * D, generator=gen)
    base[:, :, ::2] = e.transpose(0, 1)
    base = base.to(DEVICE).requires_grad_()
    e_view = base.transpose(0, 1)[:, :, ::2]                 # [M, B, D], non-contiguous
    present_view = present.T.contiguous().to(DEVICE).T        # [M, B], non-contiguous
    w = torch.rand(3, B, 3, generator=gen).to(DEVICE).requires_grad_()
    w_view = w.transpose(0, 1)                                # [B, M, M], non-contiguous
    assert not e_view.is_contiguous() and not present_view.is_contiguous() and not w_view.is_contiguous()
    out = sf.multi_pair_info_nce(e_view, present_view, weights=w_view, form=form, backend=backend)
    e_r, w_r = ref_leaf(e), ref_leaf(w.transpose(0, 1))
    ref = ref_pair_losses(e_r, present, 1 / 0.07, w_r, form)
    assert_value_close(out, ref, 1e-5, 3e-6, "losses (strided inputs)")
    gb, gw = torch.autograd.grad(out.sum(), [base, w])
    ge_r, gw_r = torch.autograd.grad(ref.sum(), [e_r, w_r])
    assert_grad_close(gb.transpose(0, 1)[:, :, ::2], ge_r, name="d embeddings")
    assert (gb[:, :, 1::2] == 0).all()
    assert_grad_close(gw.transpose(0, 1), gw_r, name="d weights")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, dtype):
    _run_case(backend, 980, M=3, B=10 if is_slow(backend) else 45, D=16, pattern="mixed", form="ntxent",
              wkind="MM", scale_kind="tensor", dtype=dtype, rtol=LOW_RTOL, grtol=LOW_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_logit_scale(backend):
    """A Python int logit_scale is a number like any other."""
    e = make_embeddings(torch_gen(990), torch.ones(2, 9, dtype=torch.bool), 7)
    out = sf.multi_pair_info_nce(e.to(DEVICE), logit_scale=10, backend=backend)
    assert_value_close(out, ref_pair_losses(e.double(), None, 10.0, None, "ntxent"), name="int logit_scale")


# ------------------------------------------------------------------ row_range (local rows x global columns)
ROW_RANGE_BACKENDS = [b for b in BACKENDS if b in ("torch", "triton")]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend,seed", backend_cases(3, 1, ROW_RANGE_BACKENDS))
def test_row_range_partition_matches_reference(backend, seed, form):
    """The contrastive op's row_range partial losses over a partition of the batch sum to the float64
    reference losses, with every gradient (the process-group path runs the op this way)."""
    ops = importlib.import_module({"torch": "scale_fast.backends.torch.ops", "triton": "scale_fast.backends.triton.ops"}[backend])
    rng = case_rng("row_range", backend, seed, form)
    M = rng.randint(2, 4)
    B, D = sizes(backend, rng, B=rng.choice([9, 13, 17]) if is_slow(backend) else None)
    B = max(B, 3)
    present = make_present(rng, M, B, rng.choice(["all", "random", "mixed"]))
    gen = torch_gen(8100 + seed)
    e = make_embeddings(gen, present, D, fill="nan")
    w = torch.rand(B, M, M, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    s_val = rng.choice([1 / 0.07, 3.7, 50.0])
    cuts = sorted(rng.sample(range(1, B), 2))
    parts = [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], B)]
    op = ops.contrastive  # the backend's own op (the dispatcher would fall back where row_range is missing)
    e_dev, w_dev = dev_leaf(e), dev_leaf(w.float())
    s_dev = torch.tensor(s_val, device=DEVICE, requires_grad=True)
    pres_dev = present.to(DEVICE)
    total = sum(op(e_dev, pres_dev, s_dev, w_dev[a:b], form, (a, b)) for a, b in parts)
    e_ref, w_ref = ref_leaf(e), ref_leaf(w.float())
    s_ref = torch.tensor(float(s_val), dtype=torch.float64, requires_grad=True)
    ref = ref_pair_losses(e_ref, present, s_ref, w_ref, form)
    assert_value_close(total, ref, 1e-5, max(1e-6, 2e-7 * s_val * 1.5), "sum of row_range losses")
    G = torch.randn(M, M, generator=gen, dtype=torch.float64)
    g_lib = grads((total * G.to(total.dtype).to(DEVICE)).sum(), [e_dev, w_dev, s_dev])
    g_ref = grads((ref * G).sum(), [e_ref, w_ref, s_ref])
    for name, gl, gr in zip(("embeddings", "weights", "logit_scale"), g_lib, g_ref):
        assert_grad_close(gl, gr, name=f"d {name}")
    assert_rows_zero_grad(g_lib[0], present)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("form", FORMS)
def test_triton_column_sums_without_a_safe_shift(form, monkeypatch):
    """With a narrow margin for the column shift, most columns take the exact fallback launch (online max),
    the others the fixed-shift relaxed-atomic sums: both must match the reference."""
    mod = importlib.import_module("scale_fast.backends.triton.contrastive")
    monkeypatch.setattr(mod, "_SHIFT_MARGIN", 16.0)
    _run_case("triton", 31 + (form == "clip"), M=3, B=11 if is_slow("triton") else 97, D=16, pattern="mixed",
              form=form, wkind="BMM", scale_kind="tensor")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(2))
def test_triton_backward_in_blocks(form, seed, monkeypatch):
    """A small dG budget: the backward runs in 16-row chunks (seed 0) or 48 x 48 blocks of three row
    tiles (seed 1), so NT-Xent's same-side triangles span several blocks and the mirrored blocks add
    the columns' gradients and softmax statistics block by block (B not a multiple of the block,
    modalities missing, row weights, a learnable scale; then the row_range partition)."""
    monkeypatch.setenv("SCALE_FAST_CONTRASTIVE_BWD_MB", ("0.0001", "0.0088")[seed])
    _run_case("triton", 40 + seed, M=3, B=(37, 107)[seed], D=16, pattern=("mixed", "all")[seed], form=form,
              wkind="BMM", scale_kind="tensor")
    test_row_range_partition_matches_reference("triton", seed, form)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("winner", range(2))
def test_triton_backward_autotune_keeps_no_stale_statistics(monkeypatch, winner):
    """Two dG configs with different tiles write different statistic slots: the first backward (which
    autotunes, here with a stand-in clock that makes config `winner` the fastest) must give the same
    gradients as the second (which reuses the choice)."""
    mod = importlib.import_module("scale_fast.backends.triton.contrastive_kernels")
    kernel = mod._contrastive_dg_kernel
    configs = [triton_config(bm, bn) for bm, bn in ((16, 32), (32, 16))]
    current = {}
    bench = kernel._bench

    def timed(*args, config, **kwargs):  # the interpreter has no GPU clock
        current["config"] = config
        return bench(*args, config=config, **kwargs)

    def do_bench(fn, quantiles=None):
        fn()
        t = 1.0 if configs.index(current["config"]) == winner else 2.0
        return [t, t, t]

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", timed)
    monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)  # a cached_property: set, never read
    gen = torch_gen(77)
    present = torch.ones(2, 45, dtype=torch.bool)
    present[1, :6] = False
    e = torch.randn(2, 45, 16, generator=gen)
    w = torch.rand(45, 2, 2, generator=gen) + 0.5
    for form in FORMS:
        out = []
        for _ in range(2):
            e_dev, w_dev = dev_leaf(e), dev_leaf(w)
            s_dev = torch.tensor(3.7, device=DEVICE, requires_grad=True)
            loss = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), weights=w_dev, logit_scale=s_dev, form=form,
                                          backend="triton")
            out.append(grads(loss.sum(), [e_dev, w_dev, s_dev]))
        assert kernel.cache, "the stand-in clock was not used: nothing was autotuned"
        for name, g1, g2 in zip(("embeddings", "weights", "logit_scale"), *out):
            assert torch.equal(g1, g2), f"{form}: d {name} of the autotuning call differs from the next call"


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("form,winner", [("ntxent", 64), ("ntxent", 32), ("clip", 32)])
def test_triton_forward_autotune_first_call_is_exact(monkeypatch, form, winner):
    """The forward autotuner runs every config of the call's dot class on the same buffers; NT-Xent's
    triangle programs write `part` slots that depend on BLOCK, so a losing config's slots must not
    survive into the winner's merge.  Here the GPU config list (fp32: BLOCK 64 and 32) with a stand-in
    clock that makes BLOCK `winner` the fastest: the first, autotuning call (loss and gradients) must
    match the float64 reference and the second call."""
    mod = importlib.import_module("scale_fast.backends.triton.contrastive_kernels")
    kernel = mod._contrastive_fwd_kernel
    monkeypatch.setattr(mod, "_INTERPRET", False)
    configs = mod._fwd_configs()  # the GPU list
    monkeypatch.setattr(mod, "_INTERPRET", True)
    current, benched = {}, []
    bench = kernel._bench

    def timed(*args, config, **kwargs):  # the interpreter has no GPU clock
        current["config"] = config
        benched.append(config.kwargs["BLOCK"])
        return bench(*args, config=config, **kwargs)

    def do_bench(fn, quantiles=None):
        fn()
        t = 1.0 if current["config"].kwargs["BLOCK"] == winner else 2.0
        return [t, t, t]

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", timed)
    monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)  # a cached_property: set, never read
    B, D, s = 160, 32, 1 / 0.07
    e = torch.randn(2, B, D, generator=torch_gen(91), dtype=torch.float64)
    present = torch.ones(2, B, dtype=torch.bool)
    out = []
    for _ in range(2):
        e_dev = dev_leaf(e.float())
        loss = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), logit_scale=s, form=form, backend="triton")
        out.append((loss[0, 1].detach(), grads(loss[0, 1], [e_dev])[0]))
    assert sorted(set(benched)) == [32, 64], "the stand-in clock was not used: nothing was autotuned"
    e_ref = ref_leaf(e)
    ref = ref_pair_losses(e_ref, present, s, None, form)[0, 1]
    (g_ref,) = torch.autograd.grad(ref, [e_ref])
    for call, (value, g) in zip(("first (autotuning)", "second"), out):
        assert_value_close(value, ref, name=f"{form} loss of the {call} call")
        assert_grad_close(g, g_ref, name=f"{form} d embeddings of the {call} call")


def triton_config(block_m, block_n):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 16}, num_warps=4, num_stages=1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpp")])
def test_free_pages_released_after_large_pairs_only(monkeypatch, backend):
    """The driver hands free pages back (malloc_trim) once per call, and after a pair only when its
    buffers reach PAIR_RELEASE_BYTES (small pairs: the page faults of reuse cost more); the values do
    not depend on it."""
    import scale_fast.backends._allpairs as allpairs

    calls = []
    monkeypatch.setattr(allpairs, "release", lambda device: calls.append(device))
    gen = torch_gen(5)
    e = torch.randn(3, 9, 5, generator=gen, dtype=torch.float64)
    present = torch.ones(3, 9, dtype=torch.bool)
    present[2, :4] = False
    results = []
    for threshold in (allpairs.PAIR_RELEASE_BYTES, 1):
        monkeypatch.setattr(allpairs, "PAIR_RELEASE_BYTES", threshold)
        calls.clear()
        leaf = e.clone().requires_grad_(True)
        out = sf.multi_pair_info_nce(leaf, present, backend=backend)
        out.sum().backward()
        results.append((out.detach(), leaf.grad))
        # the forward's first release; when the threshold is met, one per pair (3) and one for the
        # workspace after the pair loop, in forward and in backward
        assert len(calls) == (1 if threshold > 1 else 9), (threshold, len(calls))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("form", ["ntxent", "clip", "siglip"])
def test_torch_workspace_reused_across_pairs(monkeypatch, form):
    """The torch kernels draw their scratch from the driver's workspace: one buffer for the pairs of a
    call (forward; backward), dropped when the call ends; bit-identical to fresh scratch per pair."""
    import contextlib
    import dataclasses

    import scale_fast.backends._allpairs as allpairs

    mod = importlib.import_module("scale_fast.backends.torch.contrastive")
    kernels = importlib.import_module("scale_fast.backends.torch." + ("siglip" if form == "siglip" else "contrastive"))
    made = []
    real_take = mod._Workspace.take

    def take(self, like, numel):
        buf = real_take(self, like, numel)
        made.append((self.held, buf.data_ptr()))
        return buf
    monkeypatch.setattr(mod._Workspace, "take", take)
    gen = torch_gen(8)
    e = torch.randn(4, 13, 6, generator=gen, dtype=torch.float64)
    present = torch.ones(4, 13, dtype=torch.bool)
    present[3, :5] = False
    w = torch.rand(13, 4, 4, generator=gen, dtype=torch.float64) + 0.5
    results = []
    for forms in (kernels.FORMS, allpairs.pair_forms(dataclasses.replace(kernels.KERNELS, workspace=contextlib.nullcontext))):
        monkeypatch.setattr(kernels, "FORMS", forms)
        made.clear()
        leaf = e.clone().requires_grad_(True)
        out = sf.multi_pair_info_nce(leaf, present, weights=w, form=form, backend="torch")
        out.sum().backward()
        results.append((out.detach(), leaf.grad, list(made)))
    (out_ws, g_ws, made_ws), (out_fresh, g_fresh, made_fresh) = results
    assert torch.equal(out_ws, out_fresh) and torch.equal(g_ws, g_fresh)
    assert made_ws and all(held for held, _ in made_ws) and not any(held for held, _ in made_fresh)
    # 6 pairs, forward and backward: the pairs share a handful of buffers (one per growth), not one each
    assert len({ptr for _, ptr in made_ws}) < len(made_ws)
    assert mod._WORKSPACE.buf is None and not mod._WORKSPACE.held


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("form", FORMS)
def test_triton_row_range_without_a_safe_shift(form, monkeypatch):
    """row_range with a narrow shift margin: most rows take the exact fallback launch (their whole LSE,
    online max), over a partition of the batch, against the float64 reference."""
    mod = importlib.import_module("scale_fast.backends.triton.contrastive")
    monkeypatch.setattr(mod, "_SHIFT_MARGIN", 2.0)
    test_row_range_partition_matches_reference("triton", 0, form)
