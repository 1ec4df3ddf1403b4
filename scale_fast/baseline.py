"""`scale-fast baseline`: a per-modality 2-layer MLP trained with `scale_fast.scale_loss` on the same
products and the same held-out split as `scale-fast pretrain`, in seconds, so that a model's R@1
has a yardstick.

Inputs per product: text, a bag of token ids (counts / length, [text_vocab_size]); table, a bag of
property ids and one of value ids ([2 * table_vocab_size]); image, video, audio, the feature rows
concatenated in order (zero-padded to the most rows any product has, at most 4,096 numbers, the
rows' mean appended when there are several).  Each modality: Linear -> ReLU -> Linear to
embed_dim.  Loss: the all-pairs contrastive term of scale_loss (no S' weights, no masked tasks).
The best held-out R@1 seen during training is kept, as `scale-fast pretrain` does.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data import collate
from .eval import retrieval
from .functional import scale_loss
from .model.config import FEATURE_MODALITIES, MODALITIES, SCALEConfig

MAX_FLAT = 4096      # most numbers of a feature modality's concatenated rows


def featurize(samples: Sequence[dict], config: SCALEConfig, rows: Optional[Dict[str, int]] = None, chunk: int = 512):
    """({modality: float [N, d]}, present [M, N], rows): the baseline's fixed-size input of every
    product; rows = {modality: rows kept}, measured on these samples unless given (the training set's)."""
    parts: Dict[str, List[torch.Tensor]] = {m: [] for m in MODALITIES}
    presents = []
    for s in range(0, len(samples), chunk):
        b = collate(list(samples[s:s + chunk]), config)
        presents.append(b.present)
        for m, vocab, ids, types in (("text", config.text_vocab_size, b.text_ids, None),
                                     ("table", config.table_vocab_size, b.table_ids, b.table_types)):
            valid = b.valid(m)
            index = ids if types is None else ids + types * vocab
            bag = torch.zeros(b.size, vocab * (1 if types is None else 2))
            bag.scatter_add_(1, index, valid.float())
            parts[m].append(bag / valid.sum(1, keepdim=True).clamp(min=1))
        for m in FEATURE_MODALITIES:
            parts[m].append((getattr(b, f"{m}_feats") * b.valid(m)[..., None], b.valid(m)))
    inputs = {m: torch.cat(parts[m]) for m in ("text", "table")}
    rows = dict(rows or {})
    for m in FEATURE_MODALITIES:
        F_dim = parts[m][0][0].shape[-1]
        if m not in rows:
            rows[m] = max(1, min(max(int(v.sum(1).max()) for _, v in parts[m]), MAX_FLAT // F_dim))
        r = rows[m]
        flat, means = [], []
        for feats, valid in parts[m]:
            means.append(feats.sum(1) / valid.sum(1, keepdim=True).clamp(min=1))
            feats = torch.nn.functional.pad(feats[:, :r], (0, 0, 0, r - min(r, feats.shape[1])))
            flat.append(feats.reshape(feats.shape[0], -1))
        inputs[m] = torch.cat(flat) if r == 1 else torch.cat([torch.cat(flat), torch.cat(means)], 1)
    return inputs, torch.cat(presents, dim=1), rows


class MLPBaseline(nn.Module):
    """One Linear -> ReLU -> Linear per modality; forward(inputs) -> embeddings [M, N, embed_dim]."""

    def __init__(self, dims: Dict[str, int], hidden: int, embed_dim: int):
        super().__init__()
        self.mlps = nn.ModuleDict({m: nn.Sequential(nn.Linear(dims[m], hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
                                   for m in MODALITIES})

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.mlps[m](inputs[m]) for m in MODALITIES])


def train_baseline(train: Sequence[dict], held_out: Sequence[dict], config: SCALEConfig, *, epochs: int = 300,
                   batch_size: int = 128, lr: float = 1e-3, hidden: int = 256, patience: int = 5,
                   eval_every: int = 5, seed: int = 0, backend: str = "auto") -> Dict[str, object]:
    """Train the baseline; returns the best held-out `retrieval` result plus "epoch" (where it was
    reached), "epochs" (run) and "seconds"."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x_train, p_train, rows = featurize(train, config)
    x_val, p_val, _ = featurize(held_out, config, rows)
    model = MLPBaseline({m: x.shape[1] for m, x in x_train.items()}, hidden, config.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    n = p_train.shape[1]
    best, best_state, best_epoch, since = None, None, 0, 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        for s in range(0, n - 1, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() < 2:
                continue
            emb = model({m: x[idx] for m, x in x_train.items()})
            loss = scale_loss(emb, p_train[:, idx], logit_scale=config.logit_scale, harmonize=False,
                              form=config.loss_form, backend=backend).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % eval_every and epoch != epochs:
            continue
        model.eval()
        with torch.no_grad():
            result = retrieval(model(x_val), p_val)
        if best is None or result["R@1"] > best["R@1"]:
            best, best_state, best_epoch, since = result, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    return {**best, "epoch": best_epoch, "epochs": epoch, "seconds": time.perf_counter() - t0}
