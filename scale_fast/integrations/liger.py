"""Liger-Kernel's names for scale_fast's linear cross entropy, for code that switches from Liger.

- ``apply_scale_fast_to_llama(model=model)`` (and qwen2, mistral, gemma, phi3, granite, mixtral): the
  ``apply_liger_kernel_to_*`` call on one instance, = ``transformers.apply(model)`` after checking
  the model type. Liger's kernel switches (rope, rms_norm, swiglu, ...) are not taken; there is no
  class-wide form (a model is always passed).
- ``FusedLinearCrossEntropyLoss``: ``LigerFusedLinearCrossEntropyLoss``'s constructor and call order,
  ``loss_fn(lin_weight, _input, target, bias=None)``; what linear_cross_entropy does not compute
  (class weights, z-loss, label smoothing, softcapping, token scaling and accuracy) raises TypeError.
"""
from __future__ import annotations

from torch import nn

from ..functional import linear_cross_entropy
from . import transformers as _hf

def _alias(model_type: str):
    def apply_to(model: nn.Module | None = None, *, backend: str = "auto") -> nn.Module:
        if model is None:
            raise TypeError(f"apply_scale_fast_to_{model_type}: pass model= (scale_fast patches instances, "
                            "not classes)")
        found = getattr(getattr(model, "config", None), "model_type", None)
        if found != model_type:
            raise TypeError(f"apply_scale_fast_to_{model_type}: the model has model_type {found!r}")
        return _hf.apply(model, backend=backend)

    apply_to.__name__ = apply_to.__qualname__ = f"apply_scale_fast_to_{model_type}"
    apply_to.__doc__ = f"apply_liger_kernel_to_{model_type}(model=...) for scale_fast: transformers.apply(model)."
    return apply_to


apply_scale_fast_to_llama = _alias("llama")
apply_scale_fast_to_qwen2 = _alias("qwen2")
apply_scale_fast_to_mistral = _alias("mistral")
apply_scale_fast_to_gemma = _alias("gemma")
apply_scale_fast_to_phi3 = _alias("phi3")
apply_scale_fast_to_granite = _alias("granite")
apply_scale_fast_to_mixtral = _alias("mixtral")

# Liger's constructor arguments that change the loss, their no-op value, and what they compute
_UNSERVED = {"ce_weight": (None, "class weights"), "lse_square_scale": (0.0, "z-loss"),
             "label_smoothing": (0.0, "label smoothing"), "softcap": (None, "final-logit softcapping"),
             "return_z_loss": (False, "z-loss"), "use_token_scaling": (False, "token scaling"),
             "return_token_accuracy": (False, "token accuracy"),
             "return_predicted_tokens": (False, "predicted tokens")}


class FusedLinearCrossEntropyLoss(nn.Module):
    """``LigerFusedLinearCrossEntropyLoss`` by scale_fast: ``loss_fn(lin_weight, _input, target, bias=None)``."""

    def __init__(self, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                 accum_dtype=None, use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, *, backend: str = "auto"):
        super().__init__()
        given = dict(ce_weight=ce_weight, lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                     softcap=softcap, return_z_loss=return_z_loss, use_token_scaling=use_token_scaling,
                     return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens)
        for name, (default, what) in _UNSERVED.items():
            value = given[name]
            if (value is not None) if default is None else (value != default):
                raise TypeError(f"FusedLinearCrossEntropyLoss: {name}={value!r} ({what}) is not computed by "
                                "scale_fast's linear_cross_entropy")
        # accum_dtype: scale_fast accumulates in float32 (float64 for float64 inputs) whatever it is
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, lin_weight, _input, target, bias=None):
        return linear_cross_entropy(_input, lin_weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, backend=self.backend)
