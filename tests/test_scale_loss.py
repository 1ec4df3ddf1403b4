"""scale_loss (docs/contract.md §3–§6) against the float64 reference, every backend."""
from __future__ import annotations

import math

import pytest
import torch

import scale_fast as sf
from conftest import (BACKENDS, DEVICE, LOW_RTOL, PATTERNS, assert_grad_close, assert_rows_zero_grad,
                      assert_value_close, backend_cases, backend_grid, case_rng, dev_leaf, grads, is_slow,
                      make_embeddings, make_present, ref_leaf, sizes, torch_gen)
from reference import RefTask, ref_scale_loss

KINDS = ("ce", "ce_noweight", "kl", "mse", "nce")
TASK_FIELDS = ("hidden", "target", "weight", "bias")


def make_task(rng, gen, kind, m, present, slow, *, need_index, N=None, dtype=torch.float32):
    """One random masked task on modality m: (spec dict of float64/int tensors, options)."""
    B = present.shape[1]
    samples = [b for b in range(B) if bool(present[m, b])]
    if N is None:
        N = rng.choice([1, 3, 8, 12] if slow else [1, 5, 17, 64, 150])
        if rng.random() < 0.08:
            N = 0
    if not samples:
        N = 0
    H = rng.choice([5, 16] if slow else [8, 19, 33])
    t = dict(kind="ce" if kind == "ce_noweight" else kind, weight=None, bias=None, ignore_index=-100,
             nce_scale=1 / 0.07, target_grad=False)
    t["hidden"] = torch.randn(N, H, generator=gen, dtype=torch.float64)
    t["sample_index"] = torch.tensor([rng.choice(samples) for _ in range(N)], dtype=torch.long)
    if not need_index and rng.random() < 0.5:
        t["sample_index"] = None
    K = rng.choice([11, 37] if slow else [17, 70, 257])
    with_head = kind == "ce" or (kind in ("kl", "mse", "nce") and rng.random() < 0.7)
    if with_head:
        t["weight"] = torch.randn(K, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
        if rng.random() < 0.5:
            t["bias"] = 0.3 * torch.randn(K, generator=gen, dtype=torch.float64)
    else:
        K = H
    if kind in ("ce", "ce_noweight"):
        t["ignore_index"] = rng.choice([-100, -1])
        target = torch.randint(0, K, (N,), generator=gen)
        frac = 1.0 if rng.random() < 0.1 else rng.choice([0.0, 0.25])
        drop = torch.rand(N, generator=gen) < frac
        t["target"] = torch.where(drop, torch.full_like(target, t["ignore_index"]), target)
    elif kind == "kl":
        q = torch.softmax(2 * torch.randn(N, K, generator=gen, dtype=torch.float64), -1)
        if rng.random() < 0.3:  # exact zeros in the soft target (0 log 0 = 0): no target gradient then
            q = torch.where(torch.rand(N, K, generator=gen) < 0.3, torch.zeros_like(q), q)
            q = q / q.sum(-1, keepdim=True).clamp(min=1e-300)
        else:
            t["target_grad"] = True
        t["target"] = q
    else:  # mse / nce: target features
        t["target"] = torch.randn(N, K, generator=gen, dtype=torch.float64)
        t["target_grad"] = True
        if kind == "nce":
            t["nce_scale"] = rng.choice([1 / 0.07, 5.0])
    for k in ("hidden", "weight", "bias"):
        if t[k] is not None:
            t[k] = t[k].to(dtype)
    if t["target"].is_floating_point():
        t["target"] = t["target"].to(dtype)
    return t


def fixed_case(rng, seed, M, B, pattern, D, kinds, *, N, need_index=True, dtype=torch.float32, present_only=False,
               slow=True):
    """present [M, B], embeddings and one task per kind on modalities 0, 1, ... with N rows each."""
    present = make_present(rng, M, B, pattern)
    gen = torch_gen(seed)
    e = make_embeddings(gen, present, D, dtype=dtype)
    specs = {m: make_task(rng, gen, kind, m, present, slow, need_index=need_index, N=N, dtype=dtype)
             for m, kind in enumerate(kinds) if not present_only or present[m].any()}
    return present, e, specs

def build_tasks(specs):
    """(lib tasks, ref tasks, [(name, lib leaf, ref leaf)])."""
    lib, ref, leaves = {}, {}, []
    for m, t in specs.items():
        L, R = {}, {}
        for k in TASK_FIELDS:
            x = t[k]
            if x is None:
                L[k] = R[k] = None
                continue
            rg = x.is_floating_point() and (k != "target" or t["target_grad"])
            L[k] = dev_leaf(x, requires_grad=rg)
            R[k] = ref_leaf(x, requires_grad=rg)
            if rg:
                leaves.append((f"task{m}.{k}", L[k], R[k]))
        idx = t["sample_index"]
        lib[m] = sf.MaskedTask(t["kind"], L["hidden"], L["target"], weight=L["weight"], bias=L["bias"],
                               sample_index=idx.to(DEVICE) if idx is not None else None,
                               ignore_index=t["ignore_index"], nce_scale=t["nce_scale"])
        ref[m] = RefTask(t["kind"], R["hidden"], R["target"], weight=R["weight"], bias=R["bias"],
                         sample_index=idx, ignore_index=t["ignore_index"], nce_scale=t["nce_scale"])
    return lib, ref, leaves


def run_and_compare(backend, present, e, *, task_specs=None, te=None, mode="sample", form="ntxent",
                    harmonize=True, detach=False, scale_kind="default", scale_val=1 / 0.07, rtol=1e-5,
                    atol=1e-6, grtol=1e-4, seed=0):
    M, B = present.shape
    pdt = torch.float64 if e.dtype == torch.float64 else torch.float32
    e_dev, e_ref = dev_leaf(e), ref_leaf(e)
    leaves = [("embeddings", e_dev, e_ref)]
    te_dev = te_ref = None
    if te is not None:
        te_dev, te_ref = dev_leaf(te), ref_leaf(te)
        leaves.append(("task_embeddings", te_dev, te_ref))
    kwargs = {}
    s_ref = 1 / 0.07
    if scale_kind == "float":
        kwargs["logit_scale"] = s_ref = scale_val
    elif scale_kind == "tensor":
        s_dev = torch.tensor(scale_val, dtype=pdt, device=DEVICE, requires_grad=True)
        s_ref = ref_leaf(s_dev)
        kwargs["logit_scale"] = s_dev
        leaves.append(("logit_scale", s_dev, s_ref))
    lib_tasks, ref_tasks, task_leaves = build_tasks(task_specs or {})
    leaves += task_leaves

    out = sf.scale_loss(e_dev, present.to(DEVICE), tasks=lib_tasks or None, task_embeddings=te_dev, mode=mode,
                        form=form, harmonize=harmonize, detach_weights=detach, backend=backend, **kwargs)
    ref = ref_scale_loss(e_ref, present, s_ref, ref_tasks or None, te_ref, mode, form, harmonize, detach)

    want_dtype = torch.float64 if e.dtype == torch.float64 else torch.float32
    # float32 logits carry an absolute rounding error ~ ulp(scale): losses near 0 need that much slack
    atol = max(atol, 2e-7 * float(scale_val if scale_kind != "default" else 1 / 0.07)) if e.dtype == torch.float32 \
        else atol
    assert out.total.dim() == 0
    for name in ("total", "contrastive", "masked"):
        assert getattr(out, name).dtype == want_dtype, f"{name} dtype {getattr(out, name).dtype}"
        assert_value_close(getattr(out, name), ref[name], rtol, atol, name)
    assert_value_close(out.scores, ref["scores"], max(rtol, 1e-5), max(atol, 1e-6), "scores")
    if harmonize:
        assert_value_close(out.weights, ref["weights"], max(rtol, 1e-5), max(atol, 1e-6), "weights")
    assert torch.equal(out.active.cpu(), ref["active"]), f"active {out.active} != {ref['active']}"
    # entries that must be exactly zero
    act = ref["active"]
    off = ~(torch.triu(torch.ones(M, M, dtype=torch.bool), 1) & act)
    assert (out.contrastive.detach().cpu()[off] == 0).all(), "contrastive nonzero off the active upper triangle"
    for m in range(M):
        t = (task_specs or {}).get(m)
        empty = t is None or t["hidden"].shape[0] == 0 or (
            not t["target"].is_floating_point() and bool((t["target"] == t["ignore_index"]).all()))
        if empty:
            assert float(out.masked[m]) == 0.0, f"masked[{m}] should be exactly 0"

    gen = torch_gen(10_000 + seed)
    Gc = torch.randn(M, M, generator=gen, dtype=torch.float64)
    Gm = torch.randn(M, generator=gen, dtype=torch.float64)
    L_ref = ref["total"] + (ref["contrastive"] * Gc).sum() + (ref["masked"] * Gm).sum()
    g_ref = grads(L_ref, [x[2] for x in leaves])
    L_lib = out.total + (out.contrastive * Gc.to(want_dtype).to(DEVICE)).sum() + \
        (out.masked * Gm.to(want_dtype).to(DEVICE)).sum()
    g_lib = grads(L_lib, [x[1] for x in leaves])
    for (name, l_leaf, r_leaf), gl, gr in zip(leaves, g_lib, g_ref):
        assert_grad_close(gl, gr if gr is not None else torch.zeros_like(r_leaf), grtol, name=f"d {name}")
        if gl is not None:
            assert gl.dtype == l_leaf.dtype, f"d {name} dtype {gl.dtype}"
    assert_rows_zero_grad(g_lib[0], present, "d embeddings")
    if te is not None:
        assert_rows_zero_grad(g_lib[1], present, "d task_embeddings")
    return out, ref, dict(zip([x[0] for x in leaves], g_lib))


def random_case(backend, seed, tag="scale"):
    rng = case_rng(tag, backend, seed)
    slow = is_slow(backend)
    M = rng.randint(2, 5)
    B, D = sizes(backend, rng)
    pattern = rng.choice(PATTERNS)
    mode = ("sample", "batch")[seed % 2]
    form = ("ntxent", "clip")[(seed // 2) % 2]
    harmonize = (seed // 4) % 4 != 3
    detach = harmonize and rng.random() < 0.3
    present = make_present(rng, M, B, pattern)
    gen = torch_gen(20_000 + seed)
    fill = rng.choice(["nan", "zero", "big"])
    e = make_embeddings(gen, present, D, fill=fill)
    te = make_embeddings(gen, present, rng.choice([D, 16]), fill=fill) if rng.random() < 0.5 else None
    need_index = harmonize and mode == "sample"
    specs = {}
    if seed % 10 != 9:
        mods = rng.sample(range(M), rng.randint(1, M))
        for k, m in enumerate(mods):
            kind = KINDS[(seed + k) % len(KINDS)]
            specs[m] = make_task(rng, gen, kind, m, present, slow, need_index=need_index)
    return dict(present=present, e=e, te=te, task_specs=specs, mode=mode, form=form, harmonize=harmonize,
                detach=detach, scale_kind=rng.choice(["float", "tensor", "default"]),
                scale_val=rng.choice([1 / 0.07, 2.0, 30.0]))


@pytest.mark.parametrize("backend,seed", backend_cases(50, 6))
def test_scale_loss_matches_reference(backend, seed):
    c = random_case(backend, seed)
    run_and_compare(backend, c.pop("present"), c.pop("e"), seed=seed, **c)


@pytest.mark.parametrize("backend,kind,mode", backend_grid(
    "kind,mode", [(k, m) for k in KINDS for m in ("sample", "batch")],
    [(k, ("sample", "batch")[i % 2]) for i, k in enumerate(KINDS)]))
def test_every_task_kind(backend, kind, mode):
    rng = case_rng("kind", backend, kind, mode)
    slow = is_slow(backend)
    M, (B, D) = 3, sizes(backend, rng, B=12 if slow else 80, D=16 if slow else 33)
    present = make_present(rng, M, B, "random")
    gen = torch_gen(rng.randrange(1 << 30))
    e = make_embeddings(gen, present, D)
    te = make_embeddings(gen, present, D)
    specs = {1: make_task(rng, gen, kind, 1, present, slow, need_index=True, N=8 if slow else 40)}
    for scale_kind in ("tensor",):
        run_and_compare(backend, present, e, task_specs=specs, te=te, mode=mode, form="ntxent", harmonize=True,
                        scale_kind=scale_kind, scale_val=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_with_ignored_rows_and_all_ignored_task(backend):
    rng = case_rng("ign", backend)
    present = torch.ones(3, 10, dtype=torch.bool)
    present[2, :4] = False
    gen = torch_gen(31)
    e = make_embeddings(gen, present, 16)
    specs = {0: make_task(rng, gen, "ce", 0, present, True, need_index=True, N=9),
             2: make_task(rng, gen, "ce", 2, present, True, need_index=True, N=5)}
    specs[0]["target"] = torch.tensor([3, 0, 5, 1, 2, 4, 6, 7, 8]) % specs[0]["weight"].shape[0]
    specs[0]["target"][::2] = specs[0]["ignore_index"]
    specs[2]["target"][:] = specs[2]["ignore_index"]
    out, _, _ = run_and_compare(backend, present, e, task_specs=specs, mode="sample")
    assert float(out.masked[2]) == 0.0 and float(out.masked[0]) > 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_detach_weights_cuts_the_weight_path(backend):
    present = make_present(case_rng("det", backend), 4, 10, "random")
    gen = torch_gen(32)
    e = make_embeddings(gen, present, 16)
    te = make_embeddings(gen, present, 16)
    specs = {m: make_task(case_rng("det-task", m), gen, "mse", m, present, True, need_index=True, N=6)
             for m in range(4) if present[m].any()}
    _, _, g = run_and_compare(backend, present, e, task_specs=specs, te=te, mode="sample", detach=True,
                              scale_kind="tensor")
    # with detached weights nothing reaches the task embeddings
    assert g["task_embeddings"] is None or (g["task_embeddings"] == 0).all()


@pytest.mark.parametrize("mode", ("sample", "batch"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_harmonize_off(backend, mode):
    """harmonize=False: plain unweighted losses; sample_index not needed in sample mode."""
    present, e, specs = fixed_case(case_rng("harm", backend, mode), 33, 3, 11, "mixed", 7, ("ce", "nce", "kl"), N=4,
                                   need_index=False)
    for t in specs.values():
        t["sample_index"] = None
    run_and_compare(backend, present, e, task_specs=specs, mode=mode, harmonize=False, form="clip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one(backend):
    present = torch.tensor([[True], [True], [False], [True]])
    gen = torch_gen(34)
    e = make_embeddings(gen, present, 7)
    specs = {0: make_task(case_rng("b1"), gen, "ce", 0, present, True, need_index=True, N=3),
             3: make_task(case_rng("b1b"), gen, "nce", 3, present, True, need_index=True, N=1)}
    for mode in ("sample", "batch"):
        for form in ("ntxent", "clip"):
            out, _, _ = run_and_compare(backend, present, e, task_specs=specs, mode=mode, form=form,
                                        scale_kind="tensor")
            assert torch.isfinite(out.total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_active(backend):
    """No active pair and no task: total exactly 0, finite, and backward still runs."""
    present = torch.tensor([[True, False], [False, True]])
    e = make_embeddings(torch_gen(35), present, 7)
    e_dev = dev_leaf(e)
    out = sf.scale_loss(e_dev, present.to(DEVICE), backend=backend)
    assert float(out.total) == 0.0
    assert (out.contrastive == 0).all() and (out.masked == 0).all()
    assert out.total.requires_grad, "total must stay connected to the inputs that require grad"
    out.total.backward()
    assert e_dev.grad is None or ((e_dev.grad == 0).all() and not torch.isnan(e_dev.grad).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_tensors_embeddings(backend):
    rng = case_rng("list", backend)
    present = make_present(rng, 3, 9, "random")
    gen = torch_gen(36)
    e = make_embeddings(gen, present, 16)
    specs = {1: make_task(rng, gen, "ce", 1, present, True, need_index=True, N=4)}
    lib_tasks, ref_tasks, _ = build_tasks(specs)
    leaves = [dev_leaf(e[m]) for m in range(3)]
    out = sf.scale_loss(leaves, present.to(DEVICE), tasks=lib_tasks, backend=backend)
    e_ref = ref_leaf(e)
    ref = ref_scale_loss(e_ref, present, tasks=ref_tasks)
    assert_value_close(out.total, ref["total"], name="total")
    gl = torch.autograd.grad(out.total, leaves)
    (gr,) = torch.autograd.grad(ref["total"], [e_ref])
    assert_grad_close(torch.stack(gl), gr, name="d list embeddings")


def test_bfloat16_inputs():
    present, e, specs = fixed_case(case_rng("bf16"), 37, 4, 48, "random", 33, KINDS[:4], N=20, dtype=torch.bfloat16,
                                   present_only=True, slow=False)
    out, _, _ = run_and_compare("torch", present, e, task_specs=specs, mode="sample", scale_kind="tensor",
                                rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL)
    assert out.total.dtype == torch.float32


def test_float64_inputs():
    present, e, specs = fixed_case(case_rng("f64"), 38, 3, 17, "mixed", 9, ("ce", "kl", "nce"), N=6,
                                   dtype=torch.float64, present_only=True, slow=False)
    out, _, _ = run_and_compare("torch", present, e, task_specs=specs, mode="batch", scale_kind="tensor",
                                rtol=1e-9, atol=1e-10, grtol=1e-8)
    assert out.total.dtype == torch.float64


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("mode", ("sample", "batch"))
def test_gradcheck_torch_backend(mode, with_head):
    """Finite differences in float64 through scores, S', contrastive pairs and the masked tasks.

    with_head=False avoids the fused linear cross-entropy (ce/kl tasks without a head, mse, nce);
    with_head=True routes a ce task through it."""
    present = torch.tensor([[True, True, False, True], [True, True, True, False], [True, True, True, True]])
    gen = torch_gen(39)
    e = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    te = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.float64), -1).requires_grad_()
    tgt = torch.tensor([1, -100, 5])
    tgt_nohead = torch.tensor([1, -100, 3])

    def f(e, te, s, h, W, b, h2, t2, q):
        if with_head:
            t0 = sf.MaskedTask("ce", h, tgt, weight=W, bias=b, sample_index=torch.tensor([0, 1, 3]))
        else:
            t0 = sf.MaskedTask("ce", h, tgt_nohead, sample_index=torch.tensor([0, 1, 3]))
        tasks = {0: t0,
                 1: sf.MaskedTask("kl", h * 0.5, q,
                                  sample_index=torch.tensor([0, 1, 2])),
                 2: sf.MaskedTask("mse" if with_head else "nce", h2, t2, sample_index=torch.tensor([2, 3]))}
        return sf.scale_loss(e, present, logit_scale=s, tasks=tasks, task_embeddings=te, mode=mode,
                             backend="torch").total

    assert torch.autograd.gradcheck(f, (e, te, s, h, W, b, h2, t2, q), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    """Strided embeddings, task_embeddings, hidden and sample_index views."""
    rng = case_rng("nc-scale", backend)
    M, B, D = 3, 9, 16
    present = make_present(rng, M, B, "random")
    gen = torch_gen(41)
    e = make_embeddings(gen, present, D)
    te = make_embeddings(gen, present, D)
    specs = {m: make_task(rng, gen, kind, m, present, True, need_index=True, N=6)
             for m, kind in zip(range(M), ("ce", "nce", "kl"))}
    lib_tasks, ref_tasks, leaves = build_tasks(specs)
    views = {}
    for m, t in lib_tasks.items():   # same values, transposed storage, strided sample_index
        h_t = t.hidden.detach().T.contiguous().requires_grad_()
        views[m] = h_t
        si = None
        if t.sample_index is not None:
            si = torch.stack([t.sample_index, t.sample_index], 1)[:, 0]
        lib_tasks[m] = sf.MaskedTask(t.kind, h_t.T, t.target, weight=t.weight, bias=t.bias, sample_index=si,
                                     ignore_index=t.ignore_index, nce_scale=t.nce_scale)
    e_base = e.transpose(0, 1).contiguous().to(DEVICE).requires_grad_()
    te_base = te.transpose(0, 1).contiguous().to(DEVICE).requires_grad_()
    out = sf.scale_loss(e_base.transpose(0, 1), present.to(DEVICE), tasks=lib_tasks,
                        task_embeddings=te_base.transpose(0, 1), backend=backend)
    e_r, te_r = ref_leaf(e), ref_leaf(te)
    ref = ref_scale_loss(e_r, present, 1 / 0.07, ref_tasks, te_r)
    assert_value_close(out.total, ref["total"], 1e-5, 3e-6, "total (strided inputs)")
    assert_value_close(out.masked, ref["masked"], 1e-5, 3e-6, "masked (strided inputs)")
    hs = [views[m] for m in sorted(views)]
    g = torch.autograd.grad(out.total, [e_base, te_base] + hs)
    g_r = torch.autograd.grad(ref["total"], [e_r, te_r] + [ref_tasks[m].hidden for m in sorted(views)])
    assert_grad_close(g[0].transpose(0, 1), g_r[0], name="d embeddings")
    assert_grad_close(g[1].transpose(0, 1), g_r[1], name="d task_embeddings")
    for k, m in enumerate(sorted(views)):
        assert_grad_close(g[2 + k].T, g_r[2 + k], name=f"d task{m}.hidden")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs_backends(backend, dtype):
    present, e, specs = fixed_case(case_rng("half-scale", backend, str(dtype)), 42, 3, 10, "random", 16,
                                   ("ce", "mse", "nce"), N=5, dtype=dtype, present_only=True)
    out, _, _ = run_and_compare(backend, present, e, task_specs=specs, mode="sample", scale_kind="float",
                                rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL)
    assert out.total.dtype == torch.float32


@pytest.mark.parametrize("mode", ("sample", "batch"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tasks_without_rows(backend, mode):
    """A task with N = 0 rows (every kind) contributes exactly 0 and backward still runs."""
    present, e, specs = fixed_case(case_rng("empty", backend, mode), 43, 4, 8, "all", 7, ("ce", "kl", "mse", "nce"),
                                   N=0)
    out, _, _ = run_and_compare(backend, present, e, task_specs=specs, mode=mode, scale_kind="tensor")
    assert (out.masked.detach().cpu() == 0).all()
