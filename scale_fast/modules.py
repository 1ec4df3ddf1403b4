"""nn.Module wrappers: parameters and options, with the math in scale_fast.functional."""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from . import _validate as V
from .functional import DEFAULT_LOGIT_SCALE, SIGLIP_LOGIT_BIAS, SIGLIP_LOGIT_SCALE, Embeddings, scale_loss
from .types import MaskedTask, SCALELossOutput

DEFAULT_MODALITIES = V.DEFAULT_MODALITIES


class SCALELoss(nn.Module):
    """The SCALE loss as a module, a drop-in in the spirit of OpenCLIP's ClipLoss.

    Args:
        modalities: names of the M modalities, in the order of the embeddings.
        logit_scale: the (already exponentiated) multiplier of the cosines (default 1/0.07;
            form="siglip": 10, OpenCLIP's SigLIP init).
        learnable_logit_scale: learn it as a log parameter (CLIP convention),
            initialised to ln(logit_scale) and clamped at ln(max_logit_scale).
        logit_bias: form="siglip" only: the bias added to every logit (default -10, OpenCLIP's
            SigLIP init); learnable_logit_bias: learn it (a parameter initialised to logit_bias).
        mode, form, harmonize, detach_weights, backend: as in scale_fast.scale_loss.
        process_group: a torch.distributed process group: the loss of the global batch,
            each rank passing its local batch (scale_fast.scale_loss, scale_fast/distributed.py).
        normalize: False: embeddings used as given (a model that normalises its own features).

    forward(embeddings [M, B, D], present [M, B] bool = None,
            tasks {modality name or index: MaskedTask} = None,
            task_embeddings [M, B, D'] = None) -> SCALELossOutput
    """

    def __init__(
        self,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        *,
        logit_scale: float | None = None,
        learnable_logit_scale: bool = False,
        max_logit_scale: float = 100.0,
        mode: str = "sample",
        form: str = "ntxent",
        logit_bias: float | None = None,
        learnable_logit_bias: bool = False,
        harmonize: bool = True,
        detach_weights: bool = False,
        backend: str = "auto",
        process_group=None,
        normalize: bool = True,
    ):
        super().__init__()
        self.process_group = process_group
        self.normalize = V.as_flag("normalize", normalize)
        self.modalities = tuple(modalities)
        if len(self.modalities) < 2 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be at least 2 distinct names, got {self.modalities}")
        V.check_choice("mode", mode, V.MODES)
        V.check_choice("form", form, V.FORMS)
        if logit_scale is None:
            logit_scale = SIGLIP_LOGIT_SCALE if form == "siglip" else DEFAULT_LOGIT_SCALE
        V.as_logit_scale(float(logit_scale), torch.device("cpu"))
        if logit_bias is None and form == "siglip":
            logit_bias = SIGLIP_LOGIT_BIAS
        V.as_logit_bias(logit_bias, form, torch.device("cpu"))
        if learnable_logit_bias and logit_bias is None:
            raise ValueError("learnable_logit_bias applies to form='siglip' only")
        if not max_logit_scale >= logit_scale:
            raise ValueError(f"max_logit_scale must be >= logit_scale, got {max_logit_scale} < {logit_scale}")
        self.mode, self.form, self.backend = mode, form, backend
        self.harmonize, self.detach_weights = bool(harmonize), bool(detach_weights)
        self.max_log_scale = math.log(max_logit_scale)
        if learnable_logit_scale:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        else:
            self.register_buffer("fixed_logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        if learnable_logit_bias:
            self.learned_logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        elif logit_bias is not None:
            self.register_buffer("fixed_logit_bias", torch.tensor(float(logit_bias)), persistent=False)

    def logit_scale(self) -> torch.Tensor:
        """The current multiplier (exp of the clamped log parameter when learnable)."""
        if hasattr(self, "log_logit_scale"):
            return self.log_logit_scale.clamp(max=self.max_log_scale).exp()
        return self.fixed_logit_scale

    def logit_bias(self) -> torch.Tensor | None:
        """The bias of the siglip logits (None for the other forms)."""
        if hasattr(self, "learned_logit_bias"):
            return self.learned_logit_bias
        return getattr(self, "fixed_logit_bias", None)

    def forward(
        self,
        embeddings: Embeddings,
        present: torch.Tensor | None = None,
        tasks: Mapping[Union[int, str], MaskedTask] | None = None,
        task_embeddings: Embeddings | None = None,
    ) -> SCALELossOutput:
        e = V.as_embeddings(embeddings)
        if e.shape[0] != len(self.modalities):
            raise ValueError(f"embeddings hold {e.shape[0]} modalities but the loss has {len(self.modalities)}: {self.modalities}")
        scale = self.logit_scale().to(e.device)
        bias = self.logit_bias()
        return scale_loss(
            e, present, logit_scale=scale, tasks=tasks, task_embeddings=task_embeddings, modalities=self.modalities,
            mode=self.mode, form=self.form, harmonize=self.harmonize,
            detach_weights=self.detach_weights, backend=self.backend, process_group=self.process_group,
            logit_bias=None if bias is None else bias.to(e.device), normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (f"modalities={self.modalities}, mode={self.mode!r}, form={self.form!r}, harmonize={self.harmonize}"
                + ("" if self.normalize else ", normalize=False"))
