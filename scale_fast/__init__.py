"""scale_fast: exact, fast, memory-frugal SCALE multi-modal contrastive pretraining losses.

See docs/contract.md; the public API:

    inter_modality_scores, multi_pair_info_nce, linear_cross_entropy, scale_loss,
    MaskedTask, SCALELossOutput, SCALELoss, available_backends, backend_names, explain_backend
    and the model: JointCoTransformer, SCALEConfig, SCALEModel

Each name is imported on first use (PEP 562): `import scale_fast` alone loads nothing heavy (the
`scale-fast` command answers --help without torch), the losses load torch but not the model, and
the model names load scale_fast.model.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {  # public name -> the module that defines it
    "available_backends": "._dispatch",
    "backend_names": "._dispatch",
    "explain_backend": "._dispatch",
    "inter_modality_scores": ".functional",
    "linear_cross_entropy": ".functional",
    "multi_pair_info_nce": ".functional",
    "scale_loss": ".functional",
    "SCALELoss": ".modules",
    "MaskedTask": ".types",
    "SCALELossOutput": ".types",
    "JointCoTransformer": ".model",
    "SCALEConfig": ".model",
    "SCALEModel": ".model",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    else:  # a submodule, e.g. scale_fast.backends
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors
    from ._dispatch import available_backends, backend_names, explain_backend
    from .functional import inter_modality_scores, linear_cross_entropy, multi_pair_info_nce, scale_loss
    from .model import JointCoTransformer, SCALEConfig, SCALEModel
    from .modules import SCALELoss
    from .types import MaskedTask, SCALELossOutput
