"""scale_fast.integrations.open_clip against the UNPATCHED OpenCLIP losses: values and every gradient
(features, logit scale, logit bias) per rank, float64 and float32, every flag, 1, 2 and 3 gloo processes;
create_loss under patched(); a tiny CLIP made from a config (no weights).  Skipped where open_clip does not
import (it needs torchvision, which this project's main test environment does not have: .ci/run runs this
file in its own environment)."""
from __future__ import annotations

import argparse
import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import open_clip
    import open_clip.factory
    import open_clip.loss as oc_loss
except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's operator errors beside another torch
    pytest.skip(f"open_clip does not import here: {type(exc).__name__}: {exc}", allow_module_level=True)

from scale_fast.integrations import open_clip as sf_open_clip  # noqa: E402
from conftest import rank_fixtures  # noqa: E402

ORIGINAL = {name: getattr(oc_loss, name) for name in ("ClipLoss", "SigLipLoss", "CoCaLoss")}
N, D = 4, 8  # local batch, feature width
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-6, 2e-5)}  # (value rtol, gradient rtol)
CLIP_FLAGS = list(itertools.product((False, True), (False, True), (False, True)))  # local_loss, gather_with_grad, bias
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


@pytest.fixture(autouse=True)
def _unpatched():
    sf_open_clip.unpatch()
    yield
    sf_open_clip.unpatch()


def _inputs(seed, rank, dtype, siglip=False):
    """Unit-norm features (as OpenCLIP's models return them), the logit scale (and bias) as leaves."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0 if siglip else 1 / 0.07, dtype=torch.float64)
    bias = torch.tensor(-10.0 if siglip else 0.3, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(True) for x in (img, txt, scale, bias)]


def _run(loss, inputs, with_bias, output_dict=False):
    """(value, [d image, d text, d scale, d bias]) of one forward and backward."""
    img, txt, scale, bias = inputs
    out = loss(img, txt, scale, bias if with_bias else None, output_dict=output_dict)
    value = out["contrastive_loss"] if output_dict else out
    leaves = [img, txt, scale] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, grads)]


def _pair(make, seed, rank, dtype, siglip, with_bias, output_dict=False):
    """(original's (value, grads), patched's) on the same inputs."""
    original = _run(make(ORIGINAL), _inputs(seed, rank, dtype, siglip), with_bias, output_dict)
    with sf_open_clip.patched():
        patched_cls = {name: getattr(oc_loss, name) for name in ORIGINAL}
        loss = make(patched_cls)
    assert isinstance(loss, ORIGINAL["SigLipLoss" if siglip else "ClipLoss"]) and type(loss) is not \
        ORIGINAL["SigLipLoss" if siglip else "ClipLoss"]
    return original, _run(loss, _inputs(seed, rank, dtype, siglip), with_bias, output_dict)


def _assert_same(original, patched, dtype, what):
    vrtol, grtol = TOL[dtype]
    (v0, g0), (v1, g1) = original, patched
    assert v1.dtype == v0.dtype, f"{what}: dtype {v1.dtype} != {v0.dtype}"
    torch.testing.assert_close(v1, v0, rtol=vrtol, atol=vrtol, msg=lambda m: f"{what}: value: {m}")
    for name, a, b in zip(("d image_features", "d text_features", "d logit_scale", "d logit_bias"), g1, g0):
        scale = max(float(b.abs().max()), 1.0)
        torch.testing.assert_close(a, b, rtol=grtol, atol=grtol * scale, msg=lambda m: f"{what}: {name}: {m}")


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cache_labels,with_bias,output_dict", [(False, False, False), (True, True, True),
                                                                 (True, False, True)])
def test_clip_loss_one_process(dtype, cache_labels, with_bias, output_dict):
    for seed in range(2):  # twice: the cached labels are reused
        make = lambda cls: cls["ClipLoss"](cache_labels=cache_labels)  # noqa: E731
        original, patched = _pair(make, seed, 0, dtype, False, with_bias, output_dict)
        _assert_same(original, patched, dtype, f"ClipLoss cache_labels={cache_labels} bias={with_bias}")
        if with_bias:
            assert float(patched[1][3].abs().max()) == 0.0  # a constant logit: exactly 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("output_dict", [False, True])
def test_siglip_loss_one_process(dtype, output_dict):
    original, patched = _pair(lambda cls: cls["SigLipLoss"](), 3, 0, dtype, True, True, output_dict)
    _assert_same(original, patched, dtype, "SigLipLoss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_coca_loss_contrastive_and_caption_parts(dtype):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(N, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 7, (N, 5), generator=g)
    results = []
    for patch in (False, True):
        with sf_open_clip.patched() if patch else _nothing():
            loss = oc_loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5, pad_id=0)
        img, txt, scale, _ = _inputs(5, 0, dtype)
        lg = logits.clone().requires_grad_(True)
        out = loss(img, txt, lg, labels, scale, output_dict=True)
        assert set(out) == {"contrastive_loss", "caption_loss"}
        total = out["contrastive_loss"] + out["caption_loss"]
        results.append((total.detach(), [x.detach() for x in torch.autograd.grad(total, [img, txt, scale, lg])]))
        assert isinstance(loss, ORIGINAL["CoCaLoss"]) and isinstance(loss, ORIGINAL["ClipLoss"])
    _assert_same(*results, dtype, "CoCaLoss")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_horovod_raises_one_line():
    with sf_open_clip.patched():
        with pytest.raises(ValueError, match="use_horovod=True") as info:
            oc_loss.ClipLoss(use_horovod=True)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="use_horovod=True"):
            oc_loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, use_horovod=True)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        sf_open_clip.patch(backend="cuda")
    assert not sf_open_clip.is_patched()


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                horovod=False, siglip=False, loss_dist_impl=None, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kind,args", [("ClipLoss", _args()), ("SigLipLoss", _args(siglip=True)),
                                       ("CoCaLoss", _args(model="coca_ViT-B-32"))])
def test_create_loss_under_patched(kind, args):
    """create_loss (open_clip and open_clip.factory, which looks the classes up) builds the patched
    classes inside patched() and the originals after it; the signatures are the installed version's."""
    import inspect
    before = open_clip.create_loss(args)
    assert type(before) is ORIGINAL[kind]
    with sf_open_clip.patched(backend="torch"):
        loss = open_clip.create_loss(args)
        assert open_clip.factory.create_loss(args).__class__ is type(loss)
        assert getattr(open_clip.factory, kind) is type(loss) is getattr(oc_loss, kind)
        if kind != "SigLipLoss":
            assert getattr(open_clip, kind) is type(loss)
    assert isinstance(loss, ORIGINAL[kind]) and type(loss) is not ORIGINAL[kind]
    assert loss.scale_fast_backend == "torch"
    assert inspect.signature(type(loss).forward) == inspect.signature(ORIGINAL[kind].forward)
    assert inspect.signature(type(loss).__init__) == inspect.signature(ORIGINAL[kind].__init__)
    assert type(open_clip.create_loss(args)) is ORIGINAL[kind]
    assert getattr(open_clip.factory, kind) is ORIGINAL[kind] and getattr(oc_loss, kind) is ORIGINAL[kind]
    # its value equals the original's (get_logits still works on the patched class)
    img, txt, scale, bias = _inputs(7, 0, torch.float64, kind == "SigLipLoss")
    if kind == "CoCaLoss":
        return
    bias_arg = bias if kind == "SigLipLoss" else None
    torch.testing.assert_close(loss(img, txt, scale, bias_arg), before(img, txt, scale, bias_arg))
    torch.testing.assert_close(loss.get_logits(img, txt, scale)[0] if kind == "ClipLoss" else
                               loss.get_logits(img, txt, scale, bias), before.get_logits(img, txt, scale)[0]
                               if kind == "ClipLoss" else before.get_logits(img, txt, scale, bias))


def test_patched_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with sf_open_clip.patched():
            assert oc_loss.ClipLoss is not ORIGINAL["ClipLoss"]
            raise RuntimeError("boom")
    assert oc_loss.ClipLoss is ORIGINAL["ClipLoss"] and open_clip.factory.ClipLoss is ORIGINAL["ClipLoss"]


TINY_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
                 text_cfg=dict(context_length=12, vocab_size=64, width=32, heads=2, layers=1))


def tiny_clip(seed=0, dtype=torch.float64):
    """A tiny OpenCLIP CLIP model from a config dict (no weights, nothing downloaded)."""
    from open_clip.model import CLIP
    torch.manual_seed(seed)
    return CLIP(**TINY_CLIP, output_dict=True).to(dtype)


def test_tiny_model_training_step_gradients():
    """One step of a tiny CLIP: the loss and the gradient of every parameter equal the original's."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 64, (6, 12), generator=g)
    results = []
    for patch in (False, True):
        model = tiny_clip()
        with sf_open_clip.patched() if patch else _nothing():
            loss_fn = oc_loss.ClipLoss()
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-8, atol=1e-10, msg=lambda m: f"d {name}: {m}")


# --------------------------------------------------------------------------- 2 and 3 processes
def _dist_cases():
    cases = []
    for dtype in (torch.float64, torch.float32):
        for local_loss, with_grad, with_bias in CLIP_FLAGS:
            cases.append(("clip", dtype, dict(local_loss=local_loss, gather_with_grad=with_grad), with_bias))
        for impl in SIGLIP_IMPLS:
            cases.append(("siglip", dtype, dict(dist_impl=impl), True))
    return cases


DIST_CASES = _dist_cases()


def _worker(rank, world):
    results = {}
    for idx, (form, dtype, flags, with_bias) in enumerate(DIST_CASES):
        name = "SigLipLoss" if form == "siglip" else "ClipLoss"
        make = lambda cls, name=name, flags=flags: cls[name](rank=rank, world_size=world,  # noqa: E731
                                                            **flags)
        results[idx] = _pair(make, idx, rank, dtype, form == "siglip", with_bias)
    return results


ranks2, ranks3 = rank_fixtures(_worker, "open_clip")


def _case_id(case):
    form, dtype, flags, with_bias = case
    flag = ",".join(f"{k}={v}" for k, v in flags.items())
    return f"{form}-{str(dtype).replace('torch.', '')}-{flag}{'-bias' if with_bias else ''}"


@pytest.mark.parametrize("idx", range(len(DIST_CASES)), ids=[_case_id(c) for c in DIST_CASES])
@pytest.mark.parametrize("world", [2, 3])
def test_every_flag_per_rank(request, world, idx):
    results = request.getfixturevalue(f"ranks{world}")
    form, dtype, flags, with_bias = DIST_CASES[idx]
    for rank in range(world):
        original, patched = results[rank][idx]
        _assert_same(original, patched, dtype, f"{_case_id(DIST_CASES[idx])} rank {rank} of {world}")
