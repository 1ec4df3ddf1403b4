"""form="siglip" (docs/contract.md §4): every backend against the float64 reference and OpenCLIP's SigLipLoss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import scale_fast as sf
from scale_fast.bench.contrastive import import_open_clip_loss
from conftest import (BACKENDS, DEVICE, LOW_RTOL, PATTERNS, assert_grad_close, assert_rows_zero_grad,
                      assert_value_close, backend_cases, case_rng, dev_leaf, grads, is_slow, make_aligned,
                      make_embeddings, make_present, ref_leaf, sizes, torch_gen)
from reference import RefTask, ref_pair_losses, ref_scale_loss


def _case(backend, seed, dtype):
    rng = case_rng("siglip", backend, seed)
    M = rng.randint(2, 4)
    B, D = sizes(backend, rng)
    present = make_present(rng, M, B, rng.choice(PATTERNS))
    gen = torch_gen(9100 + seed)
    e = make_embeddings(gen, present, D, fill=rng.choice(["nan", "zero", "big"]), dtype=dtype)
    w = None if seed % 3 == 0 else torch.rand(B, M, M, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    return present, e, w, rng.choice([1.0, 10.0, 1 / 0.07]), rng.choice([-10.0, -2.5, 0.0, 1.5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,seed", backend_cases(8, 3))
def test_siglip_matches_reference(backend, seed, dtype):
    check_against_reference(backend, seed, dtype, *_case(backend, seed, dtype))


def check_against_reference(backend, seed, dtype, present, e, w, s, b):
    """The backend's siglip pair losses and the gradients of every input (embeddings, logit_scale,
    logit_bias, weights) against the float64 reference; absent rows get exactly 0 gradient."""
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    e_dev, s_dev, b_dev = dev_leaf(e), dev_leaf(torch.tensor(s, dtype=pdt)), dev_leaf(torch.tensor(b, dtype=pdt))
    w_dev = None if w is None else dev_leaf(w.to(pdt))
    out = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), logit_scale=s_dev, logit_bias=b_dev, weights=w_dev,
                                 form="siglip", backend=backend)
    e_ref, s_ref, b_ref = ref_leaf(e), ref_leaf(s_dev), ref_leaf(b_dev)
    w_ref = None if w is None else ref_leaf(w.to(pdt))
    ref = ref_pair_losses(e_ref, present, s_ref, w_ref, "siglip", b_ref)
    assert out.dtype == pdt and out.shape == ref.shape
    tight, low = dtype == torch.float64, dtype in (torch.bfloat16, torch.float16)
    rtol, atol = (1e-10, 1e-10) if tight else (LOW_RTOL, LOW_RTOL) if low else (1e-5, 2e-6 * (s + abs(b)))
    assert_value_close(out, ref, rtol, atol, "siglip losses")
    G = torch.randn(ref.shape, generator=torch_gen(seed), dtype=torch.float64)
    leaves = [("embeddings", e_dev, e_ref), ("logit_scale", s_dev, s_ref), ("logit_bias", b_dev, b_ref)]
    if w is not None:
        leaves.append(("weights", w_dev, w_ref))
    g_lib = grads((out * G.to(out.dtype).to(DEVICE)).sum(), [x[1] for x in leaves])
    g_ref = grads((ref * G).sum(), [x[2] for x in leaves])
    for (name, leaf, _), gl, gr in zip(leaves, g_lib, g_ref):
        assert_grad_close(gl, torch.zeros_like(leaf, dtype=torch.float64).cpu() if gr is None else gr,
                          1e-9 if tight else LOW_RTOL if low else 1e-4, name=f"d {name}")
    assert_rows_zero_grad(g_lib[0], present)


def _open_clip_siglip():
    """open_clip.loss.SigLipLoss (its loss module alone when open_clip's __init__ needs torchvision)."""
    try:
        return import_open_clip_loss("SigLipLoss")()
    except ImportError as exc:
        pytest.skip(f"open_clip_torch: {exc}")


def _openclip_formula(a, b, s, bias):
    """OpenCLIP's SigLipLoss written out: -sum log sigmoid(labels * (s a b^T + bias)) / n."""
    logits = s * a @ b.T + bias
    labels = 2 * torch.eye(a.shape[0], dtype=a.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


@pytest.mark.parametrize("backend,seed", backend_cases(3, 1))
def test_siglip_equals_openclip(backend, seed):
    """Two modalities, all present, no weights: OpenCLIP's loss on the normalised features, values and gradients."""
    gen = torch_gen(seed)
    B, D = (5, 7) if backend == "triton" else (37, 16)
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton has no float64 kernels
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    e = torch.randn(2, B, D, generator=gen, dtype=torch.float64).to(dtype)
    s, b = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    e_dev, s_dev, b_dev = dev_leaf(e), dev_leaf(s), dev_leaf(b)
    ours = sf.multi_pair_info_nce(e_dev, logit_scale=s_dev, logit_bias=b_dev, form="siglip", backend=backend)[0, 1]
    e_ref, s_ref, b_ref = ref_leaf(e), ref_leaf(s), ref_leaf(b)
    z = F.normalize(e_ref, dim=-1)
    want = _openclip_formula(z[0], z[1], s_ref, b_ref)
    try:
        theirs = _open_clip_siglip()(z[0], z[1], s_ref, b_ref)
        assert_value_close(theirs, want, 1e-12, 1e-12, "OpenCLIP SigLipLoss vs its formula")
    except pytest.skip.Exception:
        pass
    assert_value_close(ours, want, tol, tol, "siglip vs OpenCLIP")
    for gl, gr, name in zip(grads(ours, [e_dev, s_dev, b_dev]), grads(want, [e_ref, s_ref, b_ref]),
                            ("embeddings", "logit_scale", "logit_bias")):
        assert_grad_close(gl, gr, tol * 10, name=f"d {name}")


def _d_scale_bias(e, present, mode, dtype, device="cpu", backend=None):
    """(d total / d logit_scale, d total / d logit_bias) of form "siglip" at s = 30, bias = -5, in dtype."""
    x, p = e.to(device=device, dtype=dtype), present.to(device)
    s = torch.tensor(30.0, dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor(-5.0, dtype=dtype, device=device, requires_grad=True)
    if backend is None:
        total = ref_scale_loss(x, p, s, mode=mode, form="siglip", logit_bias=b)["total"]
    else:
        total = sf.scale_loss(x, p, logit_scale=s, logit_bias=b, mode=mode, form="siglip", backend=backend).total
    return [float(g) for g in torch.autograd.grad(total, [s, b])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_scale_and_bias_gradients_float32_at_tiny_batch(backend):
    """d logit_scale and d logit_bias in float32 with confident positives (modalities of a sample nearly
    aligned, sigmoid(x) ~ 1 there): the positives' sigmoid(x) - 1 is -sigmoid(-x), in the tile that
    holds them, so these gradients stay within 4e-6 of float64 (sum_c sigmoid(x) G - G_pos, or
    sigmoid(x) - 1 rounded, lost up to 1e-4 here)."""
    cases = (("batch", 2, ()), ("sample", 3, ((4, 0), (1, 2))), ("batch", 3, ((0, 1),)))
    seeds = 1 if is_slow(backend) else 4
    err = []
    for k, (mode, B, absent) in enumerate(cases):
        for seed in range(seeds):
            present, e = make_aligned(torch_gen(9300 + 10 * k + seed), B, absent)
            want = _d_scale_bias(e, present, mode, torch.float64)
            got = _d_scale_bias(e, present, mode, torch.float32, DEVICE, backend)
            err.append(max(abs(g - w) / abs(w) for g, w in zip(got, want)))
    assert max(err) <= 4e-6, f"relative errors of (d logit_scale, d logit_bias): {err}"


def test_scale_loss_module_learns_bias():
    """SCALELoss(form="siglip", learnable_logit_bias=True): OpenCLIP's init, and the bias's gradient."""
    gen = torch_gen(4)
    M, B, D, H, K = 3, 9, 6, 5, 4
    present = torch.rand(M, B, generator=gen) < 0.8
    present[:, 0] = True
    e = make_embeddings(gen, present, D, dtype=torch.float64)
    hidden = torch.randn(7, H, generator=gen, dtype=torch.float64)
    target = torch.randint(0, K, (7,), generator=gen)
    weight = torch.randn(K, H, generator=gen, dtype=torch.float64)
    index = torch.nonzero(present[1]).squeeze(1)[:7].repeat(2)[:7].sort().values
    loss = sf.SCALELoss(["a", "b", "c"], form="siglip", learnable_logit_scale=True, learnable_logit_bias=True,
                        backend="torch").double()
    assert float(loss.logit_scale().detach()) == pytest.approx(10.0) and float(loss.logit_bias().detach()) == -10.0
    e_dev = e.clone().requires_grad_()
    out = loss(e_dev, present, {"b": sf.MaskedTask("ce", hidden, target, weight=weight, sample_index=index)})
    out.total.backward()
    e_ref, b_ref = ref_leaf(e), ref_leaf(torch.tensor(-10.0, dtype=torch.float64))
    s_ref = ref_leaf(loss.log_logit_scale)  # ln 10 as the float32 parameter holds it
    ref = ref_scale_loss(e_ref, present, s_ref.exp(), {1: RefTask("ce", hidden, target, weight, sample_index=index)},
                         form="siglip", logit_bias=b_ref)
    ref["total"].backward()
    assert_value_close(out.total, ref["total"], 1e-10, 1e-10, "total")
    assert_grad_close(loss.learned_logit_bias.grad, b_ref.grad, 1e-9, "d logit_bias")
    assert_grad_close(loss.log_logit_scale.grad, s_ref.grad, 1e-9, "d log_logit_scale")
    assert_grad_close(e_dev.grad, e_ref.grad, 1e-9, "d embeddings")


def test_logit_bias_errors():
    e = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="logit_bias applies to form='siglip'"):
        sf.multi_pair_info_nce(e, logit_bias=1.0, form="clip")
    with pytest.raises(TypeError, match="logit_bias"):
        sf.multi_pair_info_nce(e, logit_bias="1", form="siglip")
    with pytest.raises(ValueError, match="logit_bias"):
        sf.multi_pair_info_nce(e, logit_bias=torch.ones(2), form="siglip")
    with pytest.raises(ValueError, match="logit_bias"):
        sf.multi_pair_info_nce(e, logit_bias=math.inf, form="siglip")
    with pytest.raises(ValueError, match="learnable_logit_bias"):
        sf.SCALELoss(["a", "b"], learnable_logit_bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_siglip_triton_backward_in_row_chunks(monkeypatch, dtype):
    """The Triton backward with a dG buffer of a few rows (several row chunks, a short last one, D not a
    multiple of the D tile) and 16-bit inputs, against the float64 reference."""
    if "triton" not in BACKENDS:
        pytest.skip("the triton backend is not available here")
    from scale_fast.backends.triton import siglip as tsig

    monkeypatch.setattr(tsig, "_chunk_rows", lambda C, elem, unit: unit)  # one row tile per chunk
    rng = case_rng("siglip-chunks", str(dtype))
    M, B, D = 3, 37, 33
    present = make_present(rng, M, B, "all")
    gen = torch_gen(9177)
    e = make_embeddings(gen, present, D, fill="nan", dtype=dtype)
    w = torch.rand(B, M, M, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    check_against_reference("triton", 0, dtype, present, e, w, 10.0, -2.5)
