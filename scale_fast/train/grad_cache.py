"""The exact cached step (gradient caching) for batches larger than the model's memory.

`cached_step(model, batch, masks, micro_batch)` is gradient caching (GradCache, Gao et al. 2021)
through the whole model.  The contrastive batch is the whole `batch`; the model runs `micro_batch`
samples at a time:

1. every micro-batch runs forward without a graph; what the loss takes from the model is kept:
   the contrastive embeddings [M, B, D], the JCT's CLS outputs [M, B, J] (the masked tasks'
   harmonised weights) and each masked task's hidden rows [N, H] -- O(B) numbers, no activations;
2. the SCALE loss of the full batch runs on those as leaf tensors and its backward leaves the
   gradient of each of them (and of the loss's own parameters: the heads' decoders, logit_scale);
3. every micro-batch runs forward again, now with a graph, from the torch RNG state it had in
   pass 1 (the same dropout masks), and backpropagates the cached gradients of its rows.

The parameter gradients are those of one step on the full batch (whose dropout draws are the
micro-batches'); the loss is the full batch's, so weights, normalisers and every pair's negatives
span the full batch.  Peak memory is that of the model on one micro-batch plus O(B) cached rows;
with `features=` the inputs too are one micro-batch's (the batch is held without its feature rows,
each micro-batch's are read when it runs).  Cost: one extra forward pass of the model (pass 1),
and with `features=` two reads of each micro-batch's features.

Under torch.distributed (the model's loss holding a process group) the loss of pass 2 is the
global batch's, every rank runs its own micro-batches, and `average_gradients` then averages the
gradients over the ranks in one all-reduce.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import fields, replace
from typing import Callable, ContextManager, Dict, List, Optional

import torch

from ..data.batch import Batch, MaskedRows, mask_features
from ..model.config import FEATURE_MODALITIES
from ..model.scale_model import SCALEModel, SCALEOutput
from ..types import SCALELossOutput
from .rng import rng_state, set_rng_state

__all__ = ["average_gradients", "batch_rows", "cached_step", "FEATURE_FIELDS"]


def batch_rows(batch: Batch, masks: Dict[str, MaskedRows], start: int, stop: int):
    """Samples [start, stop) of a batch (views) and the masked rows of those samples (re-based)."""
    changes = {"present": batch.present[:, start:stop]}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if f.name != "present" and isinstance(v, torch.Tensor):
            changes[f.name] = v[start:stop]
    if batch.ids is not None:
        changes["ids"] = batch.ids[start:stop]
    part = {}
    for m, rows in masks.items():
        keep = ((rows.sample >= start) & (rows.sample < stop)).nonzero().squeeze(1)
        part[m] = MaskedRows(rows.sample[keep] - start, rows.position[keep], rows.target[keep],
                             None if rows.classes is None else rows.classes[keep])
    return replace(batch, **changes), part


# what `collate(..., features=False)` leaves out
FEATURE_FIELDS = ("image_feats", "video_feats", "audio_feats", "image_classes")


def cached_step(model: SCALEModel, batch: Batch, masks: Dict[str, MaskedRows], micro_batch: int, *,
                autocast: Callable[[], ContextManager] = nullcontext,
                features: Optional[Callable[[int, int], Batch]] = None) -> SCALEOutput:
    """Forward and backward of one step on `batch`, the model running `micro_batch` samples at a time.

    Accumulates into the parameters' .grad exactly what `model(batch, masks).loss.total.backward()`
    would (dropout drawn per micro-batch); returns the full batch's SCALEOutput, detached from the
    model (its `tasks` empty: the hidden rows are not kept).  `autocast` is entered around every model and loss call (e.g. bf16 autocast).
    features(start, stop): the samples [start, stop) with their feature rows (image, video and
    audio features, region classes), padded as `batch` is, for a `batch` collated without them
    (`collate(..., features=False)`, then `mask_batch(..., features="defer")`): e.g. the micro-batch
    collated again from the dataset, twice per step (passes 1 and 2), so that the features of the
    full batch never exist at once.  The masked rows' targets are read from them, and their
    feature rows zeroed.  (Without it, `mask_batch(..., features="in_place")` holds the features once.)
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
    B = batch.size
    spans = [(s, min(s + micro_batch, B)) for s in range(0, B, micro_batch)]
    states = []
    embeddings: List[torch.Tensor] = []
    task_embeddings: List[torch.Tensor] = []
    rows: Dict[str, list] = {m: [] for m in masks}
    template: Dict[str, object] = {}
    targets: Dict[str, List[torch.Tensor]] = {m: [] for m in masks}  # with `features`: each micro-batch's

    def inputs(start: int, stop: int):
        part, part_masks = batch_rows(batch, masks, start, stop)
        if features is not None:
            loaded = features(start, stop)
            part = replace(part, **{name: getattr(loaded, name) for name in FEATURE_FIELDS})
            part_masks = {m: r if m not in FEATURE_MODALITIES else MaskedRows(
                r.sample, r.position, getattr(part, f"{m}_feats")[r.sample, r.position],
                None if r.classes is None else part.image_classes[r.sample, r.position])
                for m, r in part_masks.items()}
            part = mask_features(part, part_masks)
        return part, part_masks

    # pass 1: what the loss needs, without a graph: the task rows' hidden states, and their
    # targets only where the full batch's masks lack them (`features`: read per micro-batch)
    with torch.no_grad():
        for start, stop in spans:
            states.append(rng_state(host=False))
            part, part_masks = inputs(start, stop)
            with autocast():
                out = model(part, part_masks, compute_loss=False)
            embeddings.append(out.embeddings)
            task_embeddings.append(out.task_embeddings)
            for m, task in out.tasks.items():
                template.setdefault(m, task)  # kind, head and target dtype (one micro-batch's rows)
                rows[m].append((task.hidden, task.sample_index + start))
                if features is not None:  # the model's target: class distributions for "kl", else the masked values
                    targets[m].append(part_masks[m].classes if task.kind == "kl" else part_masks[m].target)
            del out, part, part_masks
    end_state = rng_state(host=False)

    # the full batch's loss on leaf copies: their gradients are the cached ones
    emb = torch.cat(embeddings, dim=1).requires_grad_()
    cls = torch.cat(task_embeddings, dim=1).requires_grad_()
    tasks, hidden = {}, {}
    for m, parts in rows.items():
        if not parts:
            continue
        first = template[m]
        hidden[m] = torch.cat([h for h, _ in parts]).requires_grad_()
        if features is not None:
            source = torch.cat(targets[m])
        else:  # the model's target of these rows, in pass 1's order (micro-batch after micro-batch)
            source = masks[m].classes if first.kind == "kl" else masks[m].target
            keep = torch.cat([((masks[m].sample >= a) & (masks[m].sample < b)).nonzero().squeeze(1) for a, b in spans])
            if not torch.equal(keep, torch.arange(len(keep), device=keep.device)):
                source = source[keep]  # rows not sorted by sample
        tasks[m] = replace(first, hidden=hidden[m], target=source.to(first.target.dtype),
                           sample_index=torch.cat([i for _, i in parts]))
    del embeddings, task_embeddings, rows, template, targets
    present = model.loss_present(batch)
    with autocast():
        loss = model.loss(emb, present, tasks, cls)
    loss.total.backward()

    # pass 2: each micro-batch again, with a graph, backpropagating its rows' cached gradients
    offsets = {m: 0 for m in hidden}
    for (start, stop), state in zip(spans, states):
        set_rng_state(state)
        with autocast():
            out = model(*inputs(start, stop), compute_loss=False)
        outputs, grads = [], []
        for value, leaf in ((out.embeddings, emb), (out.task_embeddings, cls)):
            if leaf.grad is not None:
                outputs.append(value)
                grads.append(leaf.grad[:, start:stop])
        for m, task in out.tasks.items():
            n = task.hidden.shape[0]
            if hidden[m].grad is not None and n:
                outputs.append(task.hidden)
                grads.append(hidden[m].grad[offsets[m]:offsets[m] + n])
            offsets[m] += n
        if outputs:
            torch.autograd.backward(outputs, grads)
    set_rng_state(end_state)
    loss = SCALELossOutput(*(t.detach() for t in (loss.total, loss.contrastive, loss.masked)),
                           loss.scores.detach(), loss.weights.detach(), loss.active)
    return SCALEOutput(loss, emb.detach(), present, cls.detach(), {})


def average_gradients(parameters, group=None) -> None:
    """Average .grad over the ranks of `group` in one all-reduce (what DDP does once per step).

    A parameter without a gradient on every rank keeps none; one that has a gradient on some
    rank gets the average with zeros elsewhere.
    """
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    world = dist.get_world_size(group)
    ref = params[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)])
    dist.all_reduce(flat, group=group)
    had = flat[-len(params):]
    offset = 0
    for p, h in zip(params, had.tolist()):
        n = p.numel()
        if h > 0:
            p.grad = (flat[offset:offset + n] / world).view_as(p).to(p.dtype)
        offset += n
