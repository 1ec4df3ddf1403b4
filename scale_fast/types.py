"""Public value types: the masked task description and the loss output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._validate import TASK_KINDS, check_task_fields

__all__ = ["TASK_KINDS", "MaskedTask", "SCALELossOutput"]


@dataclass
class MaskedTask:
    """One modality's masked-modeling task (docs/contract.md §5).

    kind: "ce" (MLM, MEM, MRP classes), "kl" (MRP against soft classes),
        "mse" (MRP/MFP/MAM regression) or "nce" (contrastive MFP/MAM).
    hidden: [N, H] JCT outputs at the N masked positions.
    target: [N] int64 class ids ("ce", rows equal to ignore_index skipped),
        [N, K] probabilities ("kl") or [N, F] features ("mse", "nce").
    weight, bias: optional head [K, H], [K]; predictions are hidden @ weight.T + bias,
        or hidden itself when weight is None.
    sample_index: [N] int64, the batch sample of each row; needed in sample mode
        (harmonized weights are per sample).
    nce_scale: the multiplier of the "nce" cosines.

    Kinds, dtypes, shapes and devices are checked when the task is made (TypeError /
    ValueError naming the field); values (class ids, sample indices) when a loss uses it.
    """

    kind: str
    hidden: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    sample_index: Optional[torch.Tensor] = None
    ignore_index: int = -100
    nce_scale: float = 1 / 0.07

    def __post_init__(self):
        check_task_fields("MaskedTask.", self)


@dataclass
class SCALELossOutput:
    """What scale_loss returns (docs/contract.md §6).

    total: 0-dim loss; contrastive: [M, M] pair losses (upper triangle);
    masked: [M] task losses (0 where no task); scores: S and weights: S'
    ([B, M, M] in sample mode, [M, M] in batch mode); active: [M, M] bool.
    """

    total: torch.Tensor
    contrastive: torch.Tensor
    masked: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    active: torch.Tensor
