"""multi_pair_info_nce (partial shares, gather without gradient, normalize=False) and
scale_loss(normalize=False) under a process group against a float64 single-process reference on the
global batch, 2 and 3 gloo processes.

- partial=False: every rank's [M, M] is the global loss; the gradient on local inputs is world_size x
  the single-process gradient (gather_with_grad=True) or world_size x the gradient of the rank's own
  query terms with every column constant (gather_with_grad=False);
- partial=True: the shares sum to the global loss; backpropagating every rank's share gives each
  rank's inputs the single-process gradient (gather_with_grad=True).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import scale_fast as sf
from reference import ref_pair_losses, ref_rows, ref_scale_loss
from conftest import rank_fixtures

M, D = 3, 5
SIZES = {2: [3, 5], 3: [2, 4, 3]}
FORMS = ("ntxent", "clip", "siglip")
# (form, normalize, gather_with_grad, partial)
CASES = list(itertools.product(FORMS, (True, False), (True, False), (True, False)))
BACKENDS = sf.available_backends()


SCALE_CASES = [("sample", "clip"), ("batch", "ntxent")]


def _native(backend, form, with_grad):
    """The cases a backend runs itself (the rest fall back to torch: scale_fast/_dispatch.py)."""
    if backend == "cpp":
        return form == "siglip"
    if backend == "triton":
        return form != "siglip" and with_grad
    return True


def _cases(backend):
    return [(idx, case) for idx, case in enumerate(CASES) if _native(backend, case[0], case[2])]


def make_case(idx, sizes):
    g = torch.Generator().manual_seed(4200 + idx)
    B = sum(sizes)
    present = torch.rand(M, B, generator=g) < 0.85
    present[2, :sizes[0]] = False  # rank 0 lacks modality 2
    present[:, -1] = True
    e = torch.randn(M, B, D, generator=g, dtype=torch.float64) * (0.3 + torch.rand(M, B, 1, generator=g,
                                                                                     dtype=torch.float64))
    e = torch.where(present[..., None], e, torch.full_like(e, float("nan")))
    w = torch.rand(B, M, M, generator=g, dtype=torch.float64) + 0.5
    G = torch.randn(M, M, generator=g, dtype=torch.float64)
    return dict(present=present, e=e, w=w, G=G, scale=3.0, bias=-1.5)


def _local(case, sizes, rank):
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    return case["present"][:, rows], case["e"][:, rows], case["w"][rows]


def _worker(rank, world):
    results = {}
    for backend in BACKENDS:
        for idx, (form, normalize, with_grad, partial) in _cases(backend):
            case = make_case(idx, SIZES[world])
            present, e, w = _local(case, SIZES[world], rank)
            e = e.clone().requires_grad_(True)
            w = w.clone().requires_grad_(True)
            s = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
            b = torch.tensor(case["bias"], dtype=torch.float64, requires_grad=True) if form == "siglip" else None
            out = sf.multi_pair_info_nce(e, present, logit_scale=s, weights=w, form=form, logit_bias=b,
                                         backend=backend, normalize=normalize, process_group=dist.group.WORLD,
                                         gather_with_grad=with_grad, partial=partial)
            leaves = [e, w, s] + ([b] if b is not None else [])
            gs = torch.autograd.grad((out * case["G"]).sum(), leaves)
            results[(backend, idx)] = dict(out=out.detach(), grads=[x.detach() for x in gs])
    for mode, form in SCALE_CASES:  # scale_loss(normalize=False) under the group
        case = make_case(100, SIZES[world])
        present, e, _ = _local(case, SIZES[world], rank)
        e = e.clone().requires_grad_(True)
        out = sf.scale_loss(e, present, logit_scale=case["scale"], mode=mode, form=form, backend="torch",
                            normalize=False, process_group=dist.group.WORLD)
        (g,) = torch.autograd.grad(out.total, [e])
        results[("scale_loss", mode, form)] = dict(total=out.total.detach(), grad=g)
    return results


ranks2, ranks3 = rank_fixtures(_worker, "pairs")


# --------------------------------------------------------------------------- reference
def ref_share(q, c, present, rows, w, s, form, bias, normalize):
    """[M, M]: the loss terms of samples rows[0]..rows[1]-1 as queries (taken from q) against every column
    (taken from c), over the global normaliser of each pair."""
    zq, zc = ref_rows(q, present, normalize), ref_rows(c, present, normalize)
    out = torch.zeros(M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(i + 1, M):
            V = torch.nonzero(present[i] & present[j]).squeeze(1)
            n = V.numel()
            mine = [k for k, v in enumerate(V.tolist()) if rows[0] <= v < rows[1]]
            if not mine:
                continue
            wr = s * w[V, i, j]
            total = torch.zeros((), dtype=torch.float64)
            if form == "siglip":
                for k in mine:
                    logits = wr[k] * (zc[j, V] @ zq[i, V[k]]) + bias
                    y = -torch.ones(n, dtype=torch.float64)
                    y[k] = 1
                    total = total - torch.nn.functional.logsigmoid(y * logits).sum()
                out[i, j] = total / n
                continue
            uq, uc = torch.cat([zq[i, V], zq[j, V]]), torch.cat([zc[i, V], zc[j, V]])
            w2 = torch.cat([wr, wr])
            for half in (0, 1):
                for k in mine:
                    r = k + half * n
                    if form == "ntxent":
                        cols = [x for x in range(2 * n) if x != r]
                        partner = (r + n) % (2 * n)
                        logits = w2[r] * (uc[cols] @ uq[r])
                        pos = w2[r] * (uc[partner] @ uq[r])
                    else:  # clip: row of one modality against the columns of the other
                        other = uc[n:] if half == 0 else uc[:n]
                        logits = w2[r] * (other @ uq[r])
                        pos = logits[k]
                    total = total + torch.logsumexp(logits, 0) - pos
            out[i, j] = total / (2 * n)
    return out


def _grad(out, leaves):
    """Gradients of out w.r.t. leaves; zeros where out or a leaf has no graph."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


def _reference(case, sizes, rank, form, normalize):
    """(global loss, its gradients, the rank's share, its gradients with live columns, with constant columns)."""
    start = sum(sizes[:rank])
    rows = (start, start + sizes[rank])
    e = case["e"].clone().requires_grad_(True)
    w = case["w"].clone().requires_grad_(True)
    s = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(case["bias"], dtype=torch.float64, requires_grad=True)
    bias = b if form == "siglip" else None
    leaves = [e, w, s] + ([b] if bias is not None else [])
    full = ref_pair_losses(e, case["present"], s, w, form, bias, normalize=normalize)
    g_full = _grad((full * case["G"]).sum(), leaves)
    share = ref_share(e, e, case["present"], rows, w, s, form, bias, normalize)
    g_share = _grad((share * case["G"]).sum(), leaves)
    share_q = ref_share(e, e.detach(), case["present"], rows, w, s, form, bias, normalize)
    g_query = _grad((share_q * case["G"]).sum(), leaves)
    return full.detach(), g_full, share.detach(), g_share, g_query, slice(*rows)


def _close(got, want, rtol, what):
    want = want.to(torch.float64)
    err = float((got.double() - want).norm())
    assert err <= rtol * max(float(want.norm()), 1e-12), f"{what}: relative error {err / max(float(want.norm()), 1e-30):.3e}"


def _check(results, world, backend):
    sizes = SIZES[world]
    for idx, (form, normalize, with_grad, partial) in _cases(backend):
        case = make_case(idx, sizes)
        shares = torch.zeros(M, M, dtype=torch.float64)
        for rank in range(world):
            got = results[rank][(backend, idx)]
            full, g_full, share, g_share, g_query, rows = _reference(case, sizes, rank, form, normalize)
            what = f"{backend} {form} normalize={normalize} gather_with_grad={with_grad} partial={partial} rank {rank}"
            _close(got["out"], share if partial else full, 1e-9, f"{what}: value")
            shares += got["out"].double()
            # the gradient on this rank's embeddings and weights (local), scale and bias (replicated)
            factor = 1.0 if partial else float(world)
            if with_grad and partial:
                want_e = g_full[0][:, rows]
            elif with_grad:
                want_e = world * g_full[0][:, rows]
            else:
                want_e = factor * g_query[0][:, rows]
            _close(got["grads"][0], torch.nan_to_num(want_e), 1e-8, f"{what}: d embeddings")
            for k, name in enumerate(["weights", "logit_scale", "logit_bias"][:len(got["grads"]) - 1], start=1):
                want = factor * g_share[k]
                if name == "weights":
                    want = want[rows]
                _close(got["grads"][k], want, 1e-8, f"{what}: d {name}")
        if partial:
            _close(shares, full, 1e-9, f"{backend} {form}: the shares sum to the global loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks(ranks2, backend):
    _check(ranks2, 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_ranks(ranks3, backend):
    _check(ranks3, 3, backend)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode,form", SCALE_CASES)
def test_scale_loss_as_given_under_a_group(request, world, mode, form):
    """scale_loss(normalize=False, process_group=...): the global total on every rank, world_size x the
    single-process gradient on the local embeddings."""
    results = request.getfixturevalue(f"ranks{world}")
    sizes = SIZES[world]
    case = make_case(100, sizes)
    e = case["e"].clone().requires_grad_(True)
    ref = ref_scale_loss(e, case["present"], case["scale"], mode=mode, form=form, normalize=False)
    (g_ref,) = torch.autograd.grad(ref["total"], [e])
    for rank in range(world):
        got = results[rank][("scale_loss", mode, form)]
        start = sum(sizes[:rank])
        _close(got["total"], ref["total"].detach(), 1e-9, f"scale_loss {mode} {form} rank {rank}: total")
        _close(got["grad"], world * torch.nan_to_num(g_ref[:, start:start + sizes[rank]]), 1e-8,
               f"scale_loss {mode} {form} rank {rank}: d embeddings")
