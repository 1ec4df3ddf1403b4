"""Sanity checks of tests/reference.py itself against independent PyTorch formulations.

The reference is the ground truth of every other test, so it is checked here
against F.normalize / F.softmax / F.cross_entropy / F.kl_div / F.mse_loss on
cases where those apply (all present, no masking). Needs no scale_fast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import case_rng, make_embeddings, make_present, torch_gen
from reference import (ref_linear_cross_entropy, ref_masked_task, ref_pair_losses, ref_scale_loss, ref_scores,
                       RefTask)


def test_scores_all_present_matches_functional():
    e = torch.randn(4, 6, 5, dtype=torch.float64, generator=torch_gen(1))
    z = F.normalize(e, dim=-1)
    S_want = torch.einsum("ibd,jbd->bij", z, z)
    Sp_want = F.normalize(S_want * torch.softmax(S_want, -1), dim=-1)
    S, Sp, act = ref_scores(e, None, "sample")
    torch.testing.assert_close(S, S_want)
    torch.testing.assert_close(Sp, Sp_want)
    assert act.all()
    S, Sp, _ = ref_scores(e, None, "batch")
    torch.testing.assert_close(S, S_want.mean(0))
    torch.testing.assert_close(Sp, F.normalize(S * torch.softmax(S, -1), dim=-1))


def test_scores_missing_is_submatrix():
    """A sample's S' over its present modalities equals S' computed on them alone."""
    present = make_present(case_rng("refsub"), 4, 10, "random")
    e = make_embeddings(torch_gen(2), present, 6, dtype=torch.float64)
    S, Sp, _ = ref_scores(e, present, "sample")
    for b in range(10):
        idx = present[:, b].nonzero()[:, 0]
        if len(idx) == 0:
            assert (Sp[b] == 0).all()
            continue
        z = F.normalize(e[idx, b], dim=-1)
        s = z @ z.T
        want = F.normalize(s * torch.softmax(s, -1), dim=-1)
        torch.testing.assert_close(Sp[b][idx][:, idx], want)
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[idx[:, None], idx[None, :]] = False
        assert (Sp[b][mask] == 0).all() and (S[b][mask] == 0).all()


def test_pair_losses_match_cross_entropy():
    e = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch_gen(3))
    w = torch.rand(7, 3, 3, dtype=torch.float64, generator=torch_gen(4))
    s = 2.5
    z = F.normalize(e, dim=-1)
    nt = ref_pair_losses(e, None, s, w, "ntxent")
    cl = ref_pair_losses(e, None, s, w, "clip")
    n = 7
    for i in range(3):
        for j in range(3):
            if i >= j:
                assert nt[i, j] == 0 and cl[i, j] == 0
                continue
            wb = w[:, i, j]
            u = torch.cat([z[i], z[j]])
            logits = s * torch.cat([wb, wb])[:, None] * (u @ u.T)
            logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), -math.inf)
            labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
            torch.testing.assert_close(nt[i, j], F.cross_entropy(logits, labels))
            lij = s * wb[:, None] * (z[i] @ z[j].T)
            lji = s * wb[:, None] * (z[j] @ z[i].T)
            want = (F.cross_entropy(lij, torch.arange(n)) + F.cross_entropy(lji, torch.arange(n))) / 2
            torch.testing.assert_close(cl[i, j], want)


def test_nan_rows_do_not_leak():
    present = make_present(case_rng("refnan"), 4, 12, "mixed")
    e = make_embeddings(torch_gen(5), present, 6, dtype=torch.float64).requires_grad_()
    out = ref_scale_loss(e, present, mode="sample")
    out["total"].backward()
    assert torch.isfinite(out["total"]) and torch.isfinite(e.grad).all()
    assert (e.grad[~present] == 0).all()


def test_linear_cross_entropy_matches_functional():
    g = torch_gen(6)
    h, W, b = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                              dtype=torch.float64), None
    b = torch.randn(6, generator=g, dtype=torch.float64)
    sc = torch.rand(9, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, -100, 2, 2, 1, -100, 4, 3])
    q = torch.softmax(torch.randn(9, 6, generator=g, dtype=torch.float64), -1)
    for red in ("mean", "sum", "none"):
        logits = sc[:, None] * (h @ W.T + b)
        torch.testing.assert_close(ref_linear_cross_entropy(h, W, t, b, -100, sc, red),
                                   F.cross_entropy(logits, t, reduction=red))
        torch.testing.assert_close(ref_linear_cross_entropy(h, W, q, b, -100, sc, red),
                                   F.cross_entropy(logits, q, reduction=red))


def test_masked_tasks_match_functional():
    g = torch_gen(7)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    y = h @ W.T
    t = torch.tensor([0, 5, -100, 2, 2])
    torch.testing.assert_close(ref_masked_task("ce", h, t, w, W), F.cross_entropy(w[:, None] * y, t))
    q = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    q[0, 1] = 0
    want = F.kl_div(torch.log_softmax(w[:, None] * y, -1), q, reduction="sum") / 5
    torch.testing.assert_close(ref_masked_task("kl", h, q, w, W), want)
    f = torch.randn(5, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref_masked_task("mse", h, f, w, W), F.mse_loss(w[:, None] * y, f))
    logits = w[:, None] * 3.0 * (F.normalize(y, dim=-1) @ F.normalize(f, dim=-1).T)
    torch.testing.assert_close(ref_masked_task("nce", h, f, w, W, nce_scale=3.0),
                               F.cross_entropy(logits, torch.arange(5)))


def test_scale_loss_total_composition():
    present = make_present(case_rng("reftot"), 3, 8, "random")
    e = make_embeddings(torch_gen(8), present, 5, dtype=torch.float64)
    samples = [b for b in range(8) if present[0, b]]
    task = RefTask("mse", torch.randn(len(samples), 5, dtype=torch.float64),
                   torch.randn(len(samples), 5, dtype=torch.float64), sample_index=torch.tensor(samples))
    out = ref_scale_loss(e, present, 2.0, {0: task}, harmonize=True)
    act = out["active"]
    n_act = int(torch.triu(act, 1).sum())
    torch.testing.assert_close(out["total"], out["contrastive"].sum() / max(n_act, 1) + out["masked"][0])
    w = out["weights"][torch.tensor(samples), 0, 0]
    torch.testing.assert_close(out["masked"][0], F.mse_loss(w[:, None] * task.hidden, task.target))
