"""scale_fast: exact, fast, memory-frugal SCALE multi-modal contrastive pretraining losses.

See docs/contract.md; the public API:

    inter_modality_scores, multi_pair_info_nce, linear_cross_entropy, scale_loss,
    MaskedTask, SCALELossOutput, SCALELoss, available_backends, backend_names, explain_backend
"""
from ._dispatch import available_backends, backend_names, explain_backend
from .functional import inter_modality_scores, linear_cross_entropy, multi_pair_info_nce, scale_loss
from .modules import SCALELoss
from .types import MaskedTask, SCALELossOutput

__version__ = "0.1.0"

__all__ = [
    "inter_modality_scores",
    "multi_pair_info_nce",
    "linear_cross_entropy",
    "scale_loss",
    "MaskedTask",
    "SCALELossOutput",
    "SCALELoss",
    "available_backends",
    "backend_names",
    "explain_backend",
]

from .model import JointCoTransformer, SCALEConfig, SCALEModel  # noqa: E402

__all__ += ["JointCoTransformer", "SCALEConfig", "SCALEModel"]
