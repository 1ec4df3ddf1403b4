"""Evaluation: cross-modal retrieval R@K over every ordered modality pair, and masked-task accuracy."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .model.config import MODALITIES


@torch.no_grad()
def retrieval(embeddings: torch.Tensor, present: Optional[torch.Tensor] = None, *, ks: Sequence[int] = (1, 5, 10),
              modalities: Sequence[str] = MODALITIES, chunk: int = 1024) -> Dict[str, object]:
    """Cross-modal retrieval recall.

    embeddings [M, N, D] (N products), present [M, N] bool (default all True).  For every
    ordered pair (i, j), i != j, over the n_ij products that hold both: each product's
    modality-i embedding queries the modality-j embeddings of those n_ij products
    (cosine); R@k is the share whose own product ranks within the top k (ties count
    against the query).  Returns {"R@1": mean over the pairs with n_ij >= 1, ...,
    "pairs": {"text->image": {"R@1": ..., "n": n_ij}, ...}}.  Chance R@1 of a pair is 1/n_ij.
    """
    e = embeddings.float()
    M, N, _ = e.shape
    if present is None:
        present = torch.ones(M, N, dtype=torch.bool, device=e.device)
    if len(modalities) != M:
        modalities = [str(m) for m in range(M)]
    z = F.normalize(e, dim=-1)
    pairs: Dict[str, Dict[str, float]] = {}
    for i in range(M):
        for j in range(M):
            if i == j:
                continue
            rows = (present[i] & present[j]).nonzero().squeeze(1)
            n = rows.numel()
            if n == 0:
                continue
            q, g = z[i, rows], z[j, rows]
            ranks = []
            for s in range(0, n, chunk):
                sims = q[s:s + chunk] @ g.T                                   # [c, n]
                own = sims[torch.arange(sims.shape[0]), torch.arange(s, s + sims.shape[0])]
                ranks.append((sims >= own[:, None]).sum(1) - 1)               # products scoring at least as high
            ranks = torch.cat(ranks)
            entry = {f"R@{k}": float((ranks < k).float().mean()) for k in ks}
            entry["n"] = n
            pairs[f"{modalities[i]}->{modalities[j]}"] = entry
    out: Dict[str, object] = {}
    for k in ks:
        vals = [p[f"R@{k}"] for p in pairs.values()]
        out[f"R@{k}"] = sum(vals) / len(vals) if vals else 0.0
    out["pairs"] = pairs
    return out


@torch.no_grad()
def masked_accuracy(model, batch, masks) -> Dict[str, float]:
    """Top-1 accuracy of each masked task on one masked batch.

    MLM / MEM: the predicted token is the target; MRP with kl: the predicted class is the
    target distribution's top class; MRP / MFP / MAM with mse or nce: the prediction's
    most cosine-similar target among the batch's masked rows of that modality is its own.
    """
    from .model.config import MODALITY_TASK

    out = model(batch, masks, compute_loss=False)
    acc: Dict[str, float] = {}
    for m, task in out.tasks.items():
        n = task.hidden.shape[0]
        if n == 0:
            continue
        pred = F.linear(task.hidden.float(), task.weight.float(), None if task.bias is None else task.bias.float())
        name = MODALITY_TASK[m]
        if task.kind == "ce":
            acc[f"{name}_acc"] = float((pred.argmax(1) == task.target).float().mean())
        elif task.kind == "kl":
            acc[f"{name}_acc"] = float((pred.argmax(1) == task.target.argmax(1)).float().mean())
        else:
            sims = F.normalize(pred, dim=-1) @ F.normalize(task.target.float(), dim=-1).T
            acc[f"{name}_acc"] = float((sims.argmax(1) == torch.arange(n, device=sims.device)).float().mean())
    return acc


@torch.no_grad()
def encode_dataset(model, batches, device=None):
    """Concatenate model.encode over an iterable of Batches -> (embeddings [M, N, D], present [M, N])."""
    embs, pres = [], []
    for b in batches:
        if device is not None:
            b = b.to(device)
        e, p = model.encode(b)
        embs.append(e.float().cpu())
        pres.append(p.cpu())
    return torch.cat(embs, dim=1), torch.cat(pres, dim=1)


def pair_table(results: Dict[str, Dict[str, object]], metric: str = "R@1") -> str:
    """A readable table of `metric` per ordered modality pair, one column per result of `retrieval`
    (e.g. {"model": ..., "baseline": ...}); n is the number of held-out products that hold both
    modalities of the pair (chance R@1 = 1/n).  The last row is the mean over the pairs."""
    names = list(results)
    pairs: List[str] = []
    for r in results.values():
        pairs += [p for p in r.get("pairs", {}) if p not in pairs]
    rows = [["pair", "n"] + [f"{name} {metric}" for name in names]]
    for p in pairs:
        n = next((r["pairs"][p]["n"] for r in results.values() if p in r.get("pairs", {})), 0)
        rows.append([p, str(n)] + [f"{r['pairs'][p][metric]:.3f}" if p in r.get("pairs", {}) else "-"
                                   for r in results.values()])
    rows.append(["mean", ""] + [f"{r[metric]:.3f}" for r in results.values()])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
