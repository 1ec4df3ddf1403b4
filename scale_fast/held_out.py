"""Held-out evaluation of a model during and after training: retrieval and masked-task accuracy
(scale_fast/eval.py) on a held-out set collated once."""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import Subset

from .data.batch import collate, mask_batch, step_generator
from .eval import encode_dataset, masked_accuracy, retrieval
from .model.config import SCALEConfig
from .model.scale_model import SCALEModel


class HeldOut:
    """The held-out set, collated once: retrieval batches and one masked batch for task accuracy."""

    def __init__(self, dataset, config: SCALEConfig, size: int, seed: int, batch_size: int = 250):
        n = min(size, len(dataset))
        self.size = n
        self.batches = [collate(Subset(dataset, range(s, min(n, s + batch_size))), config)
                        for s in range(0, n, batch_size)]
        first = self.batches[0] if self.batches else None
        self.masked = None if first is None else mask_batch(first, config, step_generator(seed, 2**31 - 1))

    @torch.no_grad()
    def evaluate(self, model: SCALEModel, device, autocast) -> Dict[str, object]:
        was_training = model.training
        model.eval()
        try:
            with autocast():
                emb, present = encode_dataset(model, self.batches, device)
                result = retrieval(emb, present)
                if self.masked is not None:
                    batch, masks = self.masked
                    result.update(masked_accuracy(model, batch.to(device), {m: r.to(device) for m, r in masks.items()}))
        finally:
            model.train(was_training)
        return result


def format_eval(step: int, result: Dict[str, object]) -> str:
    """The one line printed per evaluation."""
    accuracies = " ".join(f"{k} {v:.3f}" for k, v in result.items() if k.endswith("_acc"))
    return (f"step {step}: held-out R@1 {result['R@1']:.3f} R@5 {result['R@5']:.3f} "
            f"R@10 {result['R@10']:.3f} {accuracies}")
