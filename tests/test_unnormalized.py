"""normalize=False (rows used as given) on every backend against the float64 reference: values and every
gradient of multi_pair_info_nce (all forms), scale_loss, SCALELoss and inter_modality_scores."""
from __future__ import annotations

import pytest
import torch

import scale_fast as sf
from conftest import (DEVICE, PATTERNS, assert_grad_close, assert_rows_zero_grad, assert_value_close, backend_cases,
                      case_rng, dev_leaf, grads, make_present, ref_leaf, sizes, torch_gen)
from reference import ref_pair_losses, ref_scale_loss, ref_scores

FORMS = ("ntxent", "clip", "siglip")


def _embeddings(gen, present, D, unit_rows: bool):
    """Rows of norm ~0.2-3 (or exactly unit rows, as a model that normalises gives), NaN where absent."""
    M, B = present.shape
    e = torch.randn(M, B, D, generator=gen, dtype=torch.float64)
    if unit_rows:
        e = e / e.norm(dim=-1, keepdim=True)
    else:
        e = e * (0.2 + 2.8 * torch.rand(M, B, 1, generator=gen, dtype=torch.float64)) / D ** 0.5
    return torch.where(present[..., None], e, torch.full_like(e, float("nan")))


def _case(backend, seed, name):
    rng = case_rng("unnormalized", name, backend, seed)
    M = rng.randint(2, 4)
    B, D = sizes(backend, rng)
    present = make_present(rng, M, B, rng.choice(PATTERNS))
    gen = torch_gen(7300 + seed)
    e = _embeddings(gen, present, D, unit_rows=seed % 2 == 0)
    w = None if seed % 3 == 0 else torch.rand(B, M, M, generator=gen, dtype=torch.float64) * 2.0 - 0.5
    return present, e, w, rng.choice([1.0, 10.0, 1 / 0.07]), rng.choice([-10.0, 0.0, 1.5])


def _tolerances(dtype, s, b=0.0):
    return (1e-10, 1e-10, 1e-9) if dtype == torch.float64 else (1e-5, 2e-6 * (s + abs(b)), 1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,seed", backend_cases(4, 2))
def test_pair_losses_as_given(backend, seed, dtype, form):
    present, e, w, s, b = _case(backend, seed, form)
    bias = b if form == "siglip" else None
    e_dev, s_dev = dev_leaf(e.to(dtype)), dev_leaf(torch.tensor(s, dtype=dtype))
    w_dev = None if w is None else dev_leaf(w.to(dtype))
    b_dev = None if bias is None else dev_leaf(torch.tensor(bias, dtype=dtype))
    out = sf.multi_pair_info_nce(e_dev, present.to(DEVICE), logit_scale=s_dev, weights=w_dev, form=form,
                                 logit_bias=b_dev, backend=backend, normalize=False)
    e_ref, s_ref = ref_leaf(e_dev), ref_leaf(s_dev)
    w_ref = None if w is None else ref_leaf(w_dev)
    b_ref = None if bias is None else ref_leaf(b_dev)
    ref = ref_pair_losses(e_ref, present, s_ref, w_ref, form, b_ref, normalize=False)
    rtol, atol, grtol = _tolerances(dtype, s, b if bias is not None else 0.0)
    assert_value_close(out, ref, rtol, atol, f"{form} losses (normalize=False)")
    leaves = [("embeddings", e_dev, e_ref), ("logit_scale", s_dev, s_ref)]
    leaves += [] if w is None else [("weights", w_dev, w_ref)]
    leaves += [] if bias is None else [("logit_bias", b_dev, b_ref)]
    G = torch.randn(ref.shape, generator=torch_gen(seed), dtype=torch.float64)
    g_lib = grads((out * G.to(out.dtype).to(DEVICE)).sum(), [x[1] for x in leaves])
    g_ref = grads((ref * G).sum(), [x[2] for x in leaves])
    for (name, leaf, _), gl, gr in zip(leaves, g_lib, g_ref):
        assert_grad_close(gl, torch.zeros_like(leaf, dtype=torch.float64).cpu() if gr is None else gr, grtol,
                          name=f"d {name}")
    assert_rows_zero_grad(g_lib[0], present)


@pytest.mark.parametrize("mode,form", [("sample", "ntxent"), ("batch", "clip"), ("sample", "siglip")])
@pytest.mark.parametrize("backend,seed", backend_cases(3, 1))
def test_scale_loss_and_module_as_given(backend, seed, mode, form):
    """scale_loss(normalize=False): scores are dot products and the pair logits s x . y; the module passes it on."""
    present, e, _, s, b = _case(backend, seed, f"scale-{mode}-{form}")
    bias = b if form == "siglip" else None
    dtype = torch.float32
    e_dev = dev_leaf(e.to(dtype))
    out = sf.scale_loss(e_dev, present.to(DEVICE), logit_scale=s, mode=mode, form=form, logit_bias=bias,
                        backend=backend, normalize=False)
    e_ref = ref_leaf(e_dev)
    ref = ref_scale_loss(e_ref, present, s, mode=mode, form=form, logit_bias=bias, normalize=False)
    rtol, atol, grtol = _tolerances(dtype, s, b if bias is not None else 0.0)
    assert_value_close(out.total, ref["total"], rtol, atol, "total (normalize=False)")
    assert_value_close(out.scores, ref["scores"], 1e-5, 1e-6, "scores (normalize=False)")
    (g_lib,) = grads(out.total, [e_dev])
    (g_ref,) = grads(ref["total"], [e_ref])
    g_ref = torch.zeros_like(e_ref) if g_ref is None else g_ref  # no active pair
    assert_grad_close(g_lib, g_ref, grtol, name="d embeddings")
    M = e.shape[0]
    module = sf.SCALELoss([f"m{i}" for i in range(M)], logit_scale=s, mode=mode, form=form, logit_bias=bias,
                          backend=backend, normalize=False)
    e_mod = dev_leaf(e.to(dtype))
    out_mod = module(e_mod, present.to(DEVICE))
    assert_value_close(out_mod.total, ref["total"], rtol, atol, "SCALELoss total (normalize=False)")
    (g_mod,) = grads(out_mod.total, [e_mod])
    assert_grad_close(g_mod, g_ref, grtol, name="SCALELoss d embeddings")


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_scores_as_given(backend, mode):
    present, e, _, _, _ = _case(backend, 1, f"scores-{mode}")
    e_dev = dev_leaf(e.to(torch.float32))
    S, Sp, _ = sf.inter_modality_scores(e_dev, present.to(DEVICE), mode=mode, normalize=False)
    e_ref = ref_leaf(e_dev)
    S_ref, Sp_ref, _ = ref_scores(e_ref, present, mode, normalize=False)
    assert_value_close(S, S_ref, 1e-5, 1e-6, "S (normalize=False)")
    (g_lib,) = grads((S + Sp).sum(), [e_dev])
    (g_ref,) = grads((S_ref + Sp_ref).sum(), [e_ref])
    assert_grad_close(g_lib, g_ref, 1e-4, name="d embeddings")


def test_unit_rows_gradient_is_not_projected():
    """On unit rows the value is the same either way, but only normalize=False gives the gradient of the
    rows as given (the normalised loss projects out each row's own direction)."""
    g = torch_gen(5)
    e = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    e = (e / e.norm(dim=-1, keepdim=True)).requires_grad_(True)
    as_given = sf.multi_pair_info_nce(e, form="clip", normalize=False)[0, 1]
    renormed = sf.multi_pair_info_nce(e, form="clip")[0, 1]
    torch.testing.assert_close(as_given, renormed)
    (g_given,) = torch.autograd.grad(as_given, e)
    (g_renormed,) = torch.autograd.grad(renormed, e)
    logits = (1 / 0.07) * e[0] @ e[1].T
    labels = torch.arange(6)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    (g_ref,) = torch.autograd.grad(ref, e)
    torch.testing.assert_close(g_given, g_ref)
    assert (g_renormed - g_ref).abs().max() > 1e-3


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_normalize_flag_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="normalize must be True or False"):
        sf.multi_pair_info_nce(torch.randn(2, 3, 4), normalize=bad)


def test_group_options_need_a_process_group():
    with pytest.raises(ValueError, match="under a process_group only"):
        sf.multi_pair_info_nce(torch.randn(2, 3, 4), partial=True)
    with pytest.raises(ValueError, match="under a process_group only"):
        sf.multi_pair_info_nce(torch.randn(2, 3, 4), gather_with_grad=False)


def test_compiles_in_one_graph():
    """normalize=False adds no host sync: torch.compile(fullgraph=True) traces it, same value and gradient."""
    present = torch.ones(3, 6, dtype=torch.bool)
    present[2, :2] = False
    e = _embeddings(torch_gen(9), present, 5, unit_rows=False).float().requires_grad_(True)

    def step(x):
        return sf.scale_loss(x, present, form="clip", backend="torch", normalize=False).total

    eager = step(e)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(e)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager, e)
    (g_compiled,) = torch.autograd.grad(compiled, e)
    torch.testing.assert_close(g_compiled, g_eager)
