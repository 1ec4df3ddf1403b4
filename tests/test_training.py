"""The cached step (scale_fast/train/grad_cache.py): float64 parameter gradients equal a full-batch step's.

The tiny model with dropout on, every masked task (MFP as "nce", whose negatives span the batch),
missing modalities and a learnable logit scale; one process and two (gloo) processes.
"""
from __future__ import annotations

import os
import socket
from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

from scale_fast.data import SyntheticProducts, collate, mask_batch
from scale_fast.model import SCALEConfig, SCALEModel
from scale_fast.train.grad_cache import average_gradients, batch_rows, cached_step


pytestmark = pytest.mark.usefixtures("one_thread")


def config(dropout=0.1, **kw):
    base = dict(hidden_size=16, jct_hidden_size=16, embed_dim=8, encoder_heads=2, jct_heads=2, jct_layers=1,
                dropout=dropout, mfp_loss="nce", learnable_logit_scale=True, harmonize_warmup_steps=0)
    base.update(kw)
    return SCALEConfig.tiny(**base)


def make(cfg, n, seed=0):
    """A float64 model and batch (masked rows sorted by sample, as mask_batch makes them)."""
    torch.manual_seed(seed)
    model = SCALEModel(cfg, backend="torch").double()
    data = SyntheticProducts(n, seed=seed, config=cfg)
    batch, masks = mask_batch(collate([data[i] for i in range(n)], cfg), cfg, torch.Generator().manual_seed(seed))
    batch = replace(batch, **{f.name: getattr(batch, f.name).double() for f in fields(batch)
                              if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).is_floating_point()})
    masks = {m: replace(r, target=r.target.double() if r.target.is_floating_point() else r.target,
                        classes=None if r.classes is None else r.classes.double()) for m, r in masks.items()}
    assert not batch.present.all()  # missing modalities
    return model, batch, masks


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def direct(model, batch, masks, seed):
    """One ordinary step: the model on the whole batch."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(batch, masks).loss.total
    loss.backward()
    return float(loss.detach()), grads(model)


def graph_reference(model, batch, masks, spans, seed):
    """The full-batch step whose dropout draws are the micro-batches': every micro-batch's forward
    kept with its graph, the loss of their concatenation, one backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [(model(*batch_rows(batch, masks, a, b), compute_loss=False), a) for a, b in spans]
    return loss_of_parts(model, batch, outs)


def loss_of_parts(model, batch, outs):
    """Backward of the loss of the concatenated micro-batch outputs [(SCALEOutput, first sample)]."""
    tasks = {}
    for m in outs[0][0].tasks:
        parts = [(o.tasks[m], a) for o, a in outs]
        tasks[m] = replace(parts[0][0], hidden=torch.cat([t.hidden for t, _ in parts]),
                           target=torch.cat([t.target for t, _ in parts]),
                           sample_index=torch.cat([t.sample_index + a for t, a in parts]))
    loss = model.loss(torch.cat([o.embeddings for o, _ in outs], 1), model.loss_present(batch), tasks,
                      torch.cat([o.task_embeddings for o, _ in outs], 1)).total
    loss.backward()
    return float(loss.detach()), grads(model)


def cached(model, batch, masks, k, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = cached_step(model, batch, masks, k)
    return float(out.loss.total), grads(model)


def assert_same(a, b, rtol=1e-9):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=1e-12)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=1e-12, msg=name)


def test_cached_step_equals_full_batch_step():
    model, batch, masks = make(config(), 10)
    # micro-batch = the batch: the same dropout draws as the ordinary step, so the same step
    assert_same(cached(model, batch, masks, 10, seed=1), direct(model, batch, masks, seed=1))
    # dropout on, 3 rows at a time (the last micro-batch shorter): the full batch with the same draws
    spans = [(0, 3), (3, 6), (6, 9), (9, 10)]
    ref = graph_reference(model, batch, masks, spans, seed=2)
    assert_same(cached(model, batch, masks, 3, seed=2), ref)
    # and the RNG leaves the step where pass 1 left it: the next draw is the same as after the reference
    after = torch.rand(3)
    graph_reference(model, batch, masks, spans, seed=2)
    assert torch.equal(after, torch.rand(3))


def test_cached_step_without_dropout_equals_ordinary_step():
    model, batch, masks = make(config(dropout=0.0, loss_mode="batch", missing="mask"), 9, seed=3)
    assert_same(cached(model, batch, masks, 4, seed=0), direct(model, batch, masks, seed=0))


def test_cached_step_reads_features_per_micro_batch():
    """features= (a batch collated without its feature rows, each micro-batch's read again from the
    dataset): the same step, bit for bit; also with masked rows not sorted by sample."""
    cfg = config()
    model, batch, masks = make(cfg, 10)
    data = SyntheticProducts(10, seed=0, config=cfg)
    want = cached(model, batch, masks, 3, seed=4)
    bare, masks_b = mask_batch(collate([data[i] for i in range(10)], cfg, features=False), cfg,
                               torch.Generator().manual_seed(0), features="defer")
    assert bare.image_feats.shape[-1] == 0 and torch.equal(masks_b["text"].target, masks["text"].target)
    lengths = {m: batch.valid(m).shape[1] for m in ("text", "image", "table", "video", "audio")}
    reads = []

    def features(start, stop):
        reads.append((start, stop))
        return collate(Subset(data, range(start, stop)), cfg, lengths=lengths, dtype=torch.float64)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    out = cached_step(model, bare, masks_b, 3, features=features)
    got = grads(model)
    assert float(out.loss.total) == want[0] and got.keys() == want[1].keys()
    assert all(torch.equal(got[n], want[1][n]) for n in want[1])
    assert reads == [(0, 3), (3, 6), (6, 9), (9, 10)] * 2  # passes 1 and 2
    flipped = {m: replace(r, sample=r.sample.flip(0), position=r.position.flip(0), target=r.target.flip(0),
                          classes=None if r.classes is None else r.classes.flip(0)) for m, r in masks.items()}
    assert_same(cached(model, batch, flipped, 3, seed=4), want)


def test_cached_step_rejects_bad_micro_batch():
    model, batch, masks = make(config(), 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="micro_batch"):
            cached_step(model, batch, masks, bad)


# --------------------------------------------------------------------------- two processes
SIZES = (5, 4)


def _worker(rank, world, init, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, batch, masks = make(config(), sum(SIZES))
        model.loss_fn.process_group = dist.group.WORLD
        lo = sum(SIZES[:rank])
        local, local_masks = batch_rows(batch, masks, lo, lo + SIZES[rank])
        torch.manual_seed(100 + rank)
        out = cached_step(model, local, local_masks, 2)
        average_gradients(model.parameters())
        torch.save({"loss": float(out.loss.total), "grads": grads(model)}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_cached_step_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # one process, the global batch, each rank's micro-batches drawing from that rank's RNG
    model, batch, masks = make(config(), sum(SIZES))
    model.zero_grad(set_to_none=True)
    outs = []
    for rank, (lo, hi) in enumerate([(0, 5), (5, 9)]):
        torch.manual_seed(100 + rank)
        outs += [(model(*batch_rows(batch, masks, a, min(a + 2, hi)), compute_loss=False), a) for a in range(lo, hi, 2)]
    loss, want = loss_of_parts(model, batch, outs)
    for res in got:
        assert res["loss"] == pytest.approx(loss, rel=1e-12)
        assert res["grads"].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(res["grads"][name], want[name], rtol=1e-9, atol=1e-12, msg=name)
