"""inter_modality_scores (docs/contract.md §3) and the backends' scores op against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import scale_fast as sf
from conftest import (DEVICE, PATTERNS, assert_grad_close, assert_rows_zero_grad,
                      assert_value_close, backend_cases, case_rng, dev_leaf, grads, make_embeddings,
                      make_present, ref_leaf, sizes, torch_gen)
from reference import ref_scores

MODES = ("sample", "batch")
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6


def _case(tag, backend, seed, mode):
    rng = case_rng(tag, backend, seed, mode)
    M = rng.randint(2, 5)
    B, D = sizes(backend, rng)
    pattern = PATTERNS[seed % len(PATTERNS)]
    present = make_present(rng, M, B, pattern)
    e = make_embeddings(torch_gen(1000 + seed), present, D, fill=rng.choice(["nan", "zero", "big", "inf"]))
    return rng, present, e


def _check(S, Sp, act, e_dev, present, e, mode, extra_inputs=()):
    e_ref = ref_leaf(e)
    S_r, Sp_r, act_r = ref_scores(e_ref, present, mode)
    assert act.dtype == torch.bool
    assert torch.equal(act.cpu(), act_r), f"active {act.cpu()} != {act_r}"
    assert S.dtype == torch.float32 and Sp.dtype == torch.float32
    assert_value_close(S, S_r, SCORE_RTOL, SCORE_ATOL, "S")
    assert_value_close(Sp, Sp_r, SCORE_RTOL, SCORE_ATOL, "S_prime")
    g = torch.Generator().manual_seed(7)
    GS = torch.randn(S_r.shape, generator=g, dtype=torch.float64)
    GP = torch.randn(Sp_r.shape, generator=g, dtype=torch.float64)
    (ge_ref,) = torch.autograd.grad((S_r * GS).sum() + (Sp_r * GP).sum(), [e_ref])
    out = (S * GS.to(S)).sum() + (Sp * GP.to(Sp)).sum()
    (ge,) = grads(out, [e_dev])
    assert_grad_close(ge, ge_ref, name="d embeddings")
    assert_rows_zero_grad(ge, present)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(24))
def test_inter_modality_scores_matches_reference(seed, mode):
    _, present, e = _case("scores", "torch", seed, mode)
    e_dev = dev_leaf(e)
    S, Sp, act = sf.inter_modality_scores(e_dev, present.to(DEVICE), mode=mode)
    M, B = present.shape
    assert S.shape == ((B, M, M) if mode == "sample" else (M, M))
    _check(S, Sp, act, e_dev, present, e, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,seed", backend_cases(8, 3))
def test_scores_through_scale_loss_backend(backend, seed, mode):
    """scale_loss(backend=...) runs the backend's scores op: its scores/weights/active match too."""
    _, present, e = _case("scores-backend", backend, seed, mode)
    e_dev = dev_leaf(e)
    out = sf.scale_loss(e_dev, present.to(DEVICE), mode=mode, backend=backend)
    _check(out.scores, out.weights, out.active, e_dev, present, e, mode)


@pytest.mark.parametrize("mode", MODES)
def test_scores_list_input_and_default_present(mode):
    M, B, D = 4, 37, 33
    e = make_embeddings(torch_gen(3), torch.ones(M, B, dtype=torch.bool), D)
    S1, Sp1, a1 = sf.inter_modality_scores(e.to(DEVICE), mode=mode)
    S2, Sp2, a2 = sf.inter_modality_scores([e[m].to(DEVICE) for m in range(M)], None, mode=mode)
    S_r, Sp_r, a_r = ref_scores(e.double(), None, mode)
    assert_value_close(S1, S_r, SCORE_RTOL, SCORE_ATOL, "S (tensor)")
    assert_value_close(S2, S_r, SCORE_RTOL, SCORE_ATOL, "S (list)")
    assert_value_close(Sp2, Sp_r, SCORE_RTOL, SCORE_ATOL, "S' (list)")
    assert a1.all() and a2.all() and a_r.all()
    # list inputs get their gradients too
    leaves = [dev_leaf(e[m]) for m in range(M)]
    S, Sp, _ = sf.inter_modality_scores(leaves, mode=mode)
    e_ref = ref_leaf(e)
    S_r, Sp_r, _ = ref_scores(e_ref, None, mode)
    (g_ref,) = torch.autograd.grad(S_r.sum() + 2 * Sp_r.sum(), [e_ref])
    gs = torch.autograd.grad(S.sum() + 2 * Sp.sum(), leaves)
    assert_grad_close(torch.stack(gs), g_ref, name="d list embeddings")


@pytest.mark.parametrize("mode", MODES)
def test_scores_known_values(mode):
    """Hand-checked: two identical modalities and one orthogonal one, a missing row."""
    e = torch.zeros(3, 2, 4)
    e[0, :, 0] = 2.0
    e[1, :, 0] = 5.0
    e[2, :, 1] = 1.0
    present = torch.tensor([[True, True], [True, True], [True, False]])
    e[2, 1] = float("nan")
    S, Sp, act = sf.inter_modality_scores(e.to(DEVICE), present.to(DEVICE), mode=mode)
    S_b = S[0] if mode == "sample" else S
    expected_S = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert_value_close(S_b, expected_S, name="S")
    # row 0: softmax over (1, 1, 0) -> R = (a, a, 0) -> S' = (1/sqrt2, 1/sqrt2, 0)
    r = 2 ** -0.5
    expected_Sp = torch.tensor([[r, r, 0.0], [r, r, 0.0], [0.0, 0.0, 1.0]])
    assert_value_close(Sp[0] if mode == "sample" else Sp, expected_Sp, name="S_prime")
    assert torch.equal(act.cpu(), torch.ones(3, 3, dtype=torch.bool))
    if mode == "sample":  # sample 1 lacks modality 2: its row/column are exactly 0
        assert (S[1, 2] == 0).all() and (S[1, :, 2] == 0).all()
        assert (Sp[1, 2] == 0).all() and (Sp[1, :, 2] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_scores_batch_of_one_and_absent_everywhere(mode):
    present = torch.tensor([[True], [False], [True]])
    e = make_embeddings(torch_gen(5), present, 7)
    e_dev = dev_leaf(e)
    S, Sp, act = sf.inter_modality_scores(e_dev, present.to(DEVICE), mode=mode)
    assert not act[1].any() and not act[:, 1].any()
    _check(S, Sp, act, e_dev, present, e, mode)


def test_scores_dtypes():
    present = torch.ones(3, 9, dtype=torch.bool)
    e = make_embeddings(torch_gen(11), present, 16)
    for dt, want in ((torch.float64, torch.float64), (torch.float32, torch.float32)):
        S, Sp, _ = sf.inter_modality_scores(e.to(dt).to(DEVICE))
        assert S.dtype == want and Sp.dtype == want
    S, Sp, _ = sf.inter_modality_scores(e.to(torch.bfloat16).to(DEVICE), mode="batch")
    S_r, Sp_r, _ = ref_scores(e.to(torch.bfloat16).double(), None, "batch")
    assert_value_close(S, S_r, 2e-2, 2e-2, "S bf16")
    assert_value_close(Sp, Sp_r, 2e-2, 2e-2, "S' bf16")


@pytest.mark.parametrize("mode", MODES)
def test_scores_float64_precise(mode):
    present = make_present(case_rng("f64", mode), 4, 23, "random")
    e = make_embeddings(torch_gen(17), present, 33, dtype=torch.float64)
    S, Sp, _ = sf.inter_modality_scores(e.to(DEVICE), present.to(DEVICE), mode=mode)
    S_r, Sp_r, _ = ref_scores(e, present, mode)
    assert S.dtype == torch.float64 and Sp.dtype == torch.float64
    assert_value_close(S, S_r, SCORE_RTOL, 1e-7, "S f64")
    assert_value_close(Sp, Sp_r, SCORE_RTOL, 1e-7, "S' f64")
