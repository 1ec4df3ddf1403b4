"""sf.SCALELoss: a thin nn.Module over sf.scale_loss (docs/contract.md §7)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import scale_fast as sf
from conftest import (BACKENDS, DEVICE, assert_grad_close, assert_value_close, backend_grid, case_rng, dev_leaf,
                      grads, is_slow, make_embeddings, make_present, ref_leaf, torch_gen)
from reference import RefTask, ref_scale_loss

NAMES = ("text", "image", "table", "video", "audio")
EXACT = dict(rtol=1e-6, atol=1e-7)


def _inputs(backend, seed, M=5):
    rng = case_rng("mod", backend, seed)
    B = rng.choice([3, 8]) if is_slow(backend) else rng.choice([5, 33, 64])
    present = make_present(rng, M, B, rng.choice(["random", "n1", "mixed"]))
    gen = torch_gen(40_000 + seed)
    e = make_embeddings(gen, present, 16)
    te = make_embeddings(gen, present, 16)
    # one ce task on the first modality that has samples, one mse task on another
    with_rows = [m for m in range(M) if present[m].any()]
    m1, m2 = with_rows[0], with_rows[-1]
    raw = {}
    for m, kind in ((m1, "ce"), (m2, "mse")) if m1 != m2 else ((m1, "ce"),):
        samples = [b for b in range(B) if present[m, b]]
        idx = torch.tensor([rng.choice(samples) for _ in range(5)])
        h = torch.randn(5, 8, generator=gen)
        if kind == "ce":
            raw[m] = dict(kind=kind, hidden=h, target=torch.randint(0, 11, (5,), generator=gen),
                          weight=torch.randn(11, 8, generator=gen) / 3, sample_index=idx)
        else:
            raw[m] = dict(kind=kind, hidden=h, target=torch.randn(5, 8, generator=gen), weight=None,
                          sample_index=idx)
    return present, e, te, raw


def _lib_tasks(raw, key=lambda m: m):
    leaves = {}
    tasks = {}
    for m, t in raw.items():
        h = dev_leaf(t["hidden"])
        W = dev_leaf(t["weight"]) if t["weight"] is not None else None
        leaves[m] = (h, W)
        tasks[key(m)] = sf.MaskedTask(t["kind"], h, t["target"].to(DEVICE), weight=W,
                                      sample_index=t["sample_index"].to(DEVICE))
    return tasks, leaves


def _flat(leaves):
    return [x for pair in leaves.values() for x in pair if x is not None]


@pytest.mark.parametrize("backend,form,mode", backend_grid(
    "form,mode", [("ntxent", "sample"), ("ntxent", "batch"), ("clip", "sample"), ("clip", "batch")],
    [("ntxent", "sample"), ("clip", "batch")]))
def test_module_matches_functional(backend, form, mode):
    present, e, te, raw = _inputs(backend, 1, M=3 if is_slow(backend) else 5)
    kw = dict(logit_scale=3.0, mode=mode, form=form, harmonize=True, detach_weights=(form == "clip"))
    M = present.shape[0]
    mod = sf.SCALELoss(NAMES[:M], backend=backend, **kw)
    assert isinstance(mod, nn.Module)

    e1, te1 = dev_leaf(e), dev_leaf(te)
    tasks1, leaves1 = _lib_tasks(raw)
    out_m = mod(e1, present.to(DEVICE), tasks1, te1)
    e2, te2 = dev_leaf(e), dev_leaf(te)
    tasks2, leaves2 = _lib_tasks(raw)
    out_f = sf.scale_loss(e2, present.to(DEVICE), tasks=tasks2, task_embeddings=te2, backend=backend, **kw)
    for name in ("total", "contrastive", "masked", "scores", "weights"):
        assert_value_close(getattr(out_m, name), getattr(out_f, name), name=name, **EXACT)
    assert torch.equal(out_m.active, out_f.active)
    g_m = grads(out_m.total, [e1, te1] + _flat(leaves1))
    g_f = grads(out_f.total, [e2, te2] + _flat(leaves2))
    for a, b in zip(g_m, g_f):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            assert_grad_close(a, b, 1e-6)

    # and both match the float64 reference
    e_r = ref_leaf(e)
    ref_tasks = {m: RefTask(t["kind"], t["hidden"].double(), t["target"].double() if t["target"].is_floating_point()
                            else t["target"], weight=t["weight"].double() if t["weight"] is not None else None,
                            sample_index=t["sample_index"]) for m, t in raw.items()}
    ref = ref_scale_loss(e_r, present, 3.0, ref_tasks, te.double(), mode, form, True, form == "clip")
    assert_value_close(out_m.total, ref["total"], name="module total vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_logit_scale(backend):
    present, e, te, raw = _inputs(backend, 2)
    mod = sf.SCALELoss(learnable_logit_scale=True, backend=backend)
    p = mod.log_logit_scale
    assert isinstance(p, nn.Parameter) and p.requires_grad
    assert p.dim() == 0 or p.numel() == 1
    assert abs(float(p) - math.log(1 / 0.07)) < 1e-6
    assert any(q is p for q in mod.parameters())
    assert "log_logit_scale" in mod.state_dict()
    mod.to(DEVICE)

    e1 = dev_leaf(e)
    tasks1, _ = _lib_tasks(raw)
    out = mod(e1, present.to(DEVICE), tasks1)
    out.total.backward()
    assert mod.log_logit_scale.grad is not None and torch.isfinite(mod.log_logit_scale.grad).all()

    # reference: d total / d log s = s * d total / d s, with s = exp(log s)
    e_r = ref_leaf(e)
    log_s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ref_tasks = {m: RefTask(t["kind"], t["hidden"].double(), t["target"].double() if t["target"].is_floating_point()
                            else t["target"], weight=t["weight"].double() if t["weight"] is not None else None,
                            sample_index=t["sample_index"]) for m, t in raw.items()}
    ref = ref_scale_loss(e_r, present, torch.exp(log_s), ref_tasks)
    assert_value_close(out.total, ref["total"], name="total")
    ge_r, gs_r = torch.autograd.grad(ref["total"], [e_r, log_s])
    assert_grad_close(e1.grad, ge_r, name="d embeddings")
    assert_grad_close(mod.log_logit_scale.grad.reshape(()), gs_r, name="d log_logit_scale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_logit_scale_is_clamped(backend):
    present, e, te, raw = _inputs(backend, 3, M=3)
    mod = sf.SCALELoss(("a", "b", "c"), learnable_logit_scale=True, max_logit_scale=100.0,
                       backend=backend).to(DEVICE)
    with torch.no_grad():
        mod.log_logit_scale.fill_(math.log(250.0))
    tasks, _ = _lib_tasks(raw)
    out = mod(dev_leaf(e), present.to(DEVICE), tasks)
    tasks2, _ = _lib_tasks(raw)
    want = sf.scale_loss(dev_leaf(e), present.to(DEVICE), logit_scale=100.0, tasks=tasks2, backend=backend)
    assert_value_close(out.total, want.total, name="clamped at 100", **EXACT)
    out.total.backward()  # no gradient beyond the clamp, but no error and nothing non-finite
    g = mod.log_logit_scale.grad
    assert g is None or (torch.isfinite(g).all() and float(g.abs().sum()) == 0.0)

    mod2 = sf.SCALELoss(("a", "b", "c"), logit_scale=10.0, learnable_logit_scale=True, max_logit_scale=20.0,
                        backend=backend)
    assert abs(float(mod2.log_logit_scale) - math.log(10.0)) < 1e-6
    tasks3, _ = _lib_tasks(raw)
    out2 = mod2.to(DEVICE)(dev_leaf(e), present.to(DEVICE), tasks3)
    tasks4, _ = _lib_tasks(raw)
    want2 = sf.scale_loss(dev_leaf(e), present.to(DEVICE), logit_scale=10.0, tasks=tasks4, backend=backend)
    assert_value_close(out2.total, want2.total, name="learnable init 10", **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_logit_scale_has_no_parameter(backend):
    mod = sf.SCALELoss(("a", "b", "c"), logit_scale=5.0, backend=backend)
    assert not [p for p in mod.parameters() if p.requires_grad]
    present, e, te, raw = _inputs(backend, 4, M=3)
    out = mod(dev_leaf(e), present.to(DEVICE))
    want = sf.scale_loss(dev_leaf(e), present.to(DEVICE), logit_scale=5.0, backend=backend)
    assert_value_close(out.total, want.total, name="fixed scale", **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tasks_keyed_by_name_or_index(backend):
    present, e, te, raw = _inputs(backend, 5)
    mod = sf.SCALELoss(backend=backend)
    by_index, _ = _lib_tasks(raw)
    by_name, _ = _lib_tasks(raw, key=lambda m: NAMES[m])
    out_i = mod(dev_leaf(e), present.to(DEVICE), by_index)
    out_n = mod(dev_leaf(e), present.to(DEVICE), by_name)
    assert_value_close(out_n.total, out_i.total, name="name vs index", **EXACT)
    assert_value_close(out_n.masked, out_i.masked, name="masked name vs index", **EXACT)
    assert (out_n.masked != 0).sum() == len(raw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_modality_names(backend):
    present, e, te, raw = _inputs(backend, 6, M=3)
    names = ("title", "photo", "specs")
    mod = sf.SCALELoss(modalities=names, backend=backend)
    by_name, _ = _lib_tasks(raw, key=lambda m: names[m])
    by_index, _ = _lib_tasks(raw)
    out_n = mod(dev_leaf(e), present.to(DEVICE), by_name)
    out_i = sf.scale_loss(dev_leaf(e), present.to(DEVICE), tasks=by_index, backend=backend)
    assert_value_close(out_n.total, out_i.total, name="custom names", **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_modality_name(backend):
    present, e, te, raw = _inputs(backend, 7)
    mod = sf.SCALELoss(backend=backend)
    tasks, _ = _lib_tasks(raw, key=lambda m: "smell")
    with pytest.raises((ValueError, KeyError), match="smell"):
        mod(dev_leaf(e), present.to(DEVICE), tasks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modalities_must_match_embeddings(backend):
    present, e, te, raw = _inputs(backend, 8, M=3)
    mod = sf.SCALELoss(backend=backend)  # five default names, three modalities given
    with pytest.raises(ValueError, match="modalities|embeddings"):
        mod(dev_leaf(e), present.to(DEVICE))
