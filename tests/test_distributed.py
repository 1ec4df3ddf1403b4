"""scale_loss under a process group (scale_fast/distributed.py) against one process on the global batch.

2 and 3 gloo processes on CPU, each holding a slice of one global batch (uneven sizes, a rank
lacking a modality, masked tasks of every kind with ignored rows and ranks without rows):

- every rank's total / contrastive / masked / active equal the single-process values;
- the gradient on a rank's local inputs is world_size x the single-process gradient of its slice;
- the mean over ranks of a replicated input's gradient (logit_scale, head weight, bias) is the
  single-process gradient.

All cases of one world size run in one spawn (module-scoped fixture) to keep the suite fast.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import scale_fast as sf
from conftest import rank_fixtures, run_ranks

import importlib

C = importlib.import_module("scale_fast.backends.torch.contrastive")

LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
M, D, H, K = 4, 6, 5, 7

# (name, mode, form, dtype, harmonize, detach, with task_embeddings)
CASES = [
    ("sample-ntxent", "sample", "ntxent", torch.float64, True, False, True),
    ("sample-clip", "sample", "clip", torch.float64, True, False, False),
    ("batch-ntxent", "batch", "ntxent", torch.float64, True, False, True),
    ("batch-clip", "batch", "clip", torch.float64, True, True, False),
    ("plain-ntxent", "sample", "ntxent", torch.float64, False, False, False),
    ("f32-sample-clip", "sample", "clip", torch.float32, True, False, True),
    ("sample-siglip", "sample", "siglip", torch.float64, True, False, True),
]
SIZES = {2: [3, 6], 3: [4, 1, 5]}
SIGLIP = [c[0] for c in CASES].index("sample-siglip")
# the compiled backend's siglip op has its row_range form: the siglip case also runs there when it is built
EXTRA = [(SIGLIP, "cpp")] if "cpp" in sf.available_backends() else []


# --------------------------------------------------------------------------- inputs
def make_case(idx: int, sizes, dtype):
    """The global batch: tensors of every sample in rank order, task rows sorted by sample."""
    g = torch.Generator().manual_seed(1000 + idx)
    B = sum(sizes)
    present = torch.rand(M, B, generator=g) < 0.8
    present[0] = True
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    present[3, offsets[1]:offsets[1] + sizes[1]] = False  # rank 1 lacks modality 3 entirely
    present[3, 0] = True
    e = torch.randn(M, B, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(M, B, 1, generator=g, dtype=torch.float64))
    e = torch.where(present[..., None], e, torch.full_like(e, float("nan"))).to(dtype)  # absent rows: NaN
    te = torch.randn(M, B, D + 1, generator=g, dtype=torch.float64).to(dtype)
    logit_scale = torch.tensor(4.0, dtype=dtype)
    tasks = {}
    for m, kind, n in ((0, "ce", 9), (1, "mse", 6), (2, "nce", 7), (3, "kl", 4)):
        samples = torch.nonzero(present[m]).squeeze(1)
        if m == 1:  # no rows on rank 0
            samples = samples[samples >= offsets[1]]
        idx_ = samples[torch.randint(0, samples.numel(), (n,), generator=g)].sort().values
        t = dict(kind=kind, hidden=torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype), sample_index=idx_)
        if kind == "ce":
            target = torch.randint(0, K, (n,), generator=g)
            target[::3] = -100  # ignored rows
            t.update(target=target, weight=torch.randn(K, H, generator=g, dtype=torch.float64).to(dtype) / 2,
                     bias=torch.randn(K, generator=g, dtype=torch.float64).to(dtype))
        elif kind == "kl":
            t.update(target=torch.softmax(torch.randn(n, K, generator=g, dtype=torch.float64), 1).to(dtype),
                     weight=torch.randn(K, H, generator=g, dtype=torch.float64).to(dtype) / 2, bias=None)
        elif kind == "mse":
            t.update(target=torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype), weight=None, bias=None)
        else:
            t.update(target=torch.randn(n, K, generator=g, dtype=torch.float64).to(dtype),
                     weight=torch.randn(K, H, generator=g, dtype=torch.float64).to(dtype) / 2, bias=None)
        tasks[m] = t
    return dict(present=present, e=e, te=te, logit_scale=logit_scale, tasks=tasks, offsets=offsets, sizes=sizes)


def local_slice(case, rank):
    """(present, e, te, tasks-raw) of rank `rank`, plus each task's row slice in the global order."""
    lo, n = case["offsets"][rank], case["sizes"][rank]
    tasks, rows = {}, {}
    for m, t in case["tasks"].items():
        keep = (t["sample_index"] >= lo) & (t["sample_index"] < lo + n)
        first = int(torch.nonzero(keep)[0]) if keep.any() else int((t["sample_index"] < lo).sum())
        rows[m] = slice(first, first + int(keep.sum()))
        tasks[m] = dict(t, hidden=t["hidden"][keep], target=t["target"][keep], sample_index=t["sample_index"][keep] - lo)
    return case["present"][:, lo:lo + n], case["e"][:, lo:lo + n], case["te"][:, lo:lo + n], tasks, rows


def run_loss(present, e, te, raw_tasks, logit_scale, mode, form, harmonize, detach, with_te, group=None,
             backend="torch", compiler=None):
    """scale_loss with fresh leaves; returns (output, {name: grad}).  compiler: run it under
    torch.compile(fullgraph=True, backend=compiler)."""
    leaves = {"e": e.clone().requires_grad_(), "logit_scale": logit_scale.clone().requires_grad_()}
    if with_te:
        leaves["te"] = te.clone().requires_grad_()
    if form == "siglip":
        leaves["logit_bias"] = torch.tensor(-2.5, dtype=logit_scale.dtype, requires_grad=True)
    for m, t in raw_tasks.items():
        leaves[f"hidden{m}"] = t["hidden"].clone().requires_grad_()
        for field in ("weight", "bias", "target"):
            if t[field] is not None and t[field].is_floating_point():
                leaves[f"{field}{m}"] = t[field].clone().requires_grad_()

    def loss(leaves):
        tasks = {m: sf.MaskedTask(t["kind"], leaves[f"hidden{m}"], leaves.get(f"target{m}", t["target"]),
                                  weight=leaves.get(f"weight{m}"), bias=leaves.get(f"bias{m}"),
                                  sample_index=t["sample_index"]) for m, t in raw_tasks.items()}
        out = sf.scale_loss(leaves["e"], present, logit_scale=leaves["logit_scale"], tasks=tasks,
                            task_embeddings=leaves.get("te"), mode=mode, form=form, harmonize=harmonize,
                            detach_weights=detach, backend=backend, process_group=group,
                            logit_bias=leaves.get("logit_bias"))
        return tuple(getattr(out, f) for f in OUTPUTS)

    if compiler is not None:
        loss = torch.compile(loss, fullgraph=True, backend=compiler)
    out = sf.SCALELossOutput(*loss(leaves))
    out.total.backward()
    return out, {k: (torch.zeros_like(v) if v.grad is None else v.grad) for k, v in leaves.items()}


OUTPUTS = ("total", "contrastive", "masked", "scores", "weights", "active")
LOCAL = ("e", "te") + tuple(f"{p}{m}" for p in ("hidden", "target") for m in range(M))
REPLICATED = ("logit_scale", "logit_bias") + tuple(f"{p}{m}" for p in ("weight", "bias") for m in range(M))


# --------------------------------------------------------------------------- workers
def _worker(rank, world):
    results = {}
    for idx, backend in [(i, "torch") for i in range(len(CASES))] + EXTRA:
        name, mode, form, dtype, harmonize, detach, with_te = CASES[idx]
        case = make_case(idx, SIZES[world], dtype)
        present, e, te, tasks, _ = local_slice(case, rank)
        out, g = run_loss(present, e, te, tasks, case["logit_scale"], mode, form, harmonize, detach, with_te,
                          group=dist.group.WORLD, backend=backend)
        results[_key(name, backend)] = dict(total=out.total.detach(), contrastive=out.contrastive.detach(),
                             masked=out.masked.detach(), active=out.active, scores=out.scores.detach(),
                             weights=out.weights.detach(), grads=g)
    # SCALELoss(process_group=...) is scale_loss(process_group=...)
    name, mode, form, dtype, harmonize, detach, with_te = CASES[0]
    case = make_case(0, SIZES[world], dtype)
    present, e, te, tasks, _ = local_slice(case, rank)
    mod = sf.SCALELoss(["a", "b", "c", "d"], logit_scale=4.0, mode=mode, form=form, backend="torch",
                       process_group=dist.group.WORLD)
    mtasks = {m: sf.MaskedTask(t["kind"], t["hidden"], t["target"], weight=t["weight"], bias=t["bias"],
                               sample_index=t["sample_index"]) for m, t in tasks.items()}
    results["module_total"] = mod(e, present, mtasks, te).total.detach()
    # a layout that differs between ranks is refused on every rank (no hang)
    case = make_case(0, SIZES[world], torch.float64)
    present, e, te, tasks, _ = local_slice(case, rank)
    if rank == 1:
        tasks.pop(2)
    try:
        run_loss(present, e, te, tasks, case["logit_scale"], "sample", "ntxent", True, False, False,
                 group=dist.group.WORLD)
        results["mismatch"] = None
    except ValueError as exc:
        results["mismatch"] = str(exc)
    return results


# torch.compile(fullgraph=True) under the group: these cases, compiled and eager on every rank
COMPILED = [c[0] for c in CASES].index("sample-ntxent"), [c[0] for c in CASES].index("batch-clip"), SIGLIP


def _compile_worker(rank, world):
    results = {}
    for idx in COMPILED:
        name, mode, form, dtype, harmonize, detach, with_te = CASES[idx]
        case = make_case(idx, SIZES[world], dtype)
        present, e, te, tasks, _ = local_slice(case, rank)
        for compiler in (None, "aot_eager"):
            torch._dynamo.reset()
            out, g = run_loss(present, e, te, tasks, case["logit_scale"], mode, form, harmonize, detach, with_te,
                              group=dist.group.WORLD, compiler=compiler)
            results[name, compiler] = dict({f: getattr(out, f).detach() for f in OUTPUTS}, grads=g)
    return results


def _key(name, backend):
    return name if backend == "torch" else f"{name}-{backend}"


ranks2, ranks3 = rank_fixtures(_worker, "dist")


# --------------------------------------------------------------------------- checks
def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.norm() > 0 else float(a.norm())


def _check(results, world, idx, backend="torch"):
    """The ranks' results of case idx on `backend` against one process on the torch backend."""
    name, mode, form, dtype, harmonize, detach, with_te = CASES[idx]
    case = make_case(idx, SIZES[world], dtype)
    ref, ref_g = run_loss(case["present"], case["e"], case["te"],
                          {m: dict(t) for m, t in case["tasks"].items()}, case["logit_scale"],
                          mode, form, harmonize, detach, with_te)
    for rank, res in enumerate(results):
        r = res[_key(name, backend)]
        for key in ("total", "contrastive", "masked"):
            torch.testing.assert_close(r[key].double(), getattr(ref, key).detach().double(),
                                       rtol=LOSS_RTOL, atol=1e-7, msg=lambda s: f"{name} rank {rank} {key}: {s}")
        assert torch.equal(r["active"], ref.active)
        lo, n = case["offsets"][rank], case["sizes"][rank]
        for key in ("scores", "weights"):
            want = getattr(ref, key).detach()
            want = want[lo:lo + n] if mode == "sample" else want
            assert _rel(r[key], want) < LOSS_RTOL, (name, rank, key)
        _, _, _, _, rows = local_slice(case, rank)
        for key in LOCAL:
            if key not in ref_g:
                continue
            want = ref_g[key]
            if key in ("e", "te"):
                want = want[:, lo:lo + n]
            else:
                want = want[rows[int(key[-1])]]
            got = r["grads"][key]
            assert got.shape == want.shape, (name, rank, key)
            assert not torch.isnan(got).any(), (name, rank, key)
            assert _rel(got, world * want) < GRAD_RTOL, (name, rank, key, _rel(got, world * want))
    for key in REPLICATED:
        if key not in ref_g:
            continue
        mean = sum(res[_key(name, backend)]["grads"][key].double() for res in results) / world
        assert _rel(mean, ref_g[key]) < GRAD_RTOL, (name, key, _rel(mean, ref_g[key]))


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_ranks_match_single_process(ranks2, idx):
    _check(ranks2, 2, idx)


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[c[0] for c in CASES])
def test_three_ranks_match_single_process(ranks3, idx):
    _check(ranks3, 3, idx)


@pytest.mark.skipif(not EXTRA, reason="backend 'cpp' not built")
@pytest.mark.parametrize("world", [2, 3])
def test_cpp_siglip_ranks_match_single_process(request, world):
    """backend="cpp" under a process group: its siglip op's row_range form on every rank."""
    _check(request.getfixturevalue(f"ranks{world}"), world, SIGLIP, backend="cpp")


def test_module_passes_process_group(ranks2):
    for res in ranks2:
        torch.testing.assert_close(res["module_total"], res[CASES[0][0]]["total"], rtol=1e-12, atol=1e-12)


def test_compiled_under_a_process_group_matches_eager(tmp_path_factory):
    """torch.compile(fullgraph=True) of scale_loss under a 2-process gloo group: one graph (the
    objective's custom op), the eager values and every gradient on every rank."""
    for rank, res in enumerate(run_ranks(_compile_worker, 2, tmp_path_factory, "dist")):
        for idx in COMPILED:
            name = CASES[idx][0]
            eager, compiled = res[name, None], res[name, "aot_eager"]
            for f in OUTPUTS:
                torch.testing.assert_close(compiled[f], eager[f], rtol=1e-10, atol=1e-12,
                                           msg=lambda s: f"{name} rank {rank} {f}: {s}")
            assert set(compiled["grads"]) == set(eager["grads"])
            assert eager["grads"]["e"].norm() > 0 and eager["grads"]["logit_scale"] != 0
            for key, want in eager["grads"].items():
                torch.testing.assert_close(compiled["grads"][key], want, rtol=1e-9, atol=1e-12,
                                           msg=lambda s: f"{name} rank {rank} grad {key}: {s}")


def test_pretrain_data_shards_cover_the_global_batch():
    from scale_fast.train.data_order import DataOrder

    single = DataOrder(50, 7, 0, True).indices(21)
    shards = [DataOrder(50, 7, 0, True, shard=(r, 3)).indices(21) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 3] and sum(shards, []) == single


def test_layout_mismatch_raises_on_every_rank(ranks2):
    for res in ranks2:
        assert res["mismatch"] is not None and "same M, D, tasks keys" in res["mismatch"]


# --------------------------------------------------------------------------- row_range (one process)
@pytest.mark.parametrize("form", ["ntxent", "clip"])
@pytest.mark.parametrize("tile", [1024, 3])
def test_row_range_partition_sums_to_full_loss(form, tile, monkeypatch):
    """Summing the row_range partial losses over a partition of the batch gives the loss and its gradients."""
    monkeypatch.setattr(C, "TILE", tile)
    g = torch.Generator().manual_seed(7)
    B = 13
    present = torch.rand(M, B, generator=g) < 0.7
    e = torch.randn(M, B, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(B, M, M, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(M, M, generator=g, dtype=torch.float64)
    full = C.contrastive(e, present, s, w, form)
    g_full = torch.autograd.grad((full * coef).sum(), [e, w, s])
    parts = sum(C.contrastive(e, present, s, w[a:b], form, row_range=(a, b)) for a, b in [(0, 4), (4, 5), (5, 13)])
    g_parts = torch.autograd.grad((parts * coef).sum(), [e, w, s])
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)
    for x, y in zip(g_parts, g_full):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_info_nce_rows_partition():
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    w = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    full = C.info_nce(a, b, w, 3.0)
    parts = (C.info_nce_rows(a[:4], b, w[:4], 3.0, 0) + C.info_nce_rows(a[4:], b, w[4:], 3.0, 4)) / 9
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(parts, [a, b, w]), torch.autograd.grad(full, [a, b, w])):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
