"""Hugging Face transformers models whose training loss scale_fast computes (docs/transformers.md).

    from scale_fast.integrations.transformers import apply, revert
    model = apply(model)            # this instance only; revert(model) restores it

- CLIPModel, SiglipModel: in training with ``return_loss=True`` the loss is ``multi_pair_info_nce``
  (form "clip" / "siglip") of the projected text and image features; the B x B logits are neither
  formed nor returned (``logits_per_text`` / ``logits_per_image`` are None).
- causal LMs (a plain ``nn.Linear`` ``lm_head`` and transformers' ``ForCausalLMLoss``): in training
  with labels the loss is ``linear_cross_entropy`` of the hidden states the model hands its lm_head
  and ``lm_head.weight`` (and bias), never the [N, vocab] logits (``logits`` is None); scalar factors
  the model applies to its logits become the per-row ``scale``.
- ``keep_logits=True`` on a call, evaluation mode, no labels / no ``return_loss``: the original forward.
"""
from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager

import torch
from torch import nn

try:
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"scale_fast.integrations.transformers needs transformers>=5.0 ({e})") from None

from .._dispatch import resolve_backend
from ..functional import linear_cross_entropy, multi_pair_info_nce

# model class -> (form of multi_pair_info_nce, output class in the model's module)
CONTRASTIVE = {"CLIPModel": ("clip", "CLIPOutput"), "SiglipModel": ("siglip", "SiglipOutput")}
_CONTRASTIVE_ARGS = ["self", "input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss",
                     "interpolate_pos_encoding", "kwargs"]
# config attributes of logit transforms linear_cross_entropy does not compute
UNSERVED = {"final_logit_softcapping": "final-logit softcapping", "z_loss_coefficient": "z-loss",
            "label_smoothing": "label smoothing"}


def apply(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Compute `model`'s training loss with scale_fast (this instance only); returns the model.

    Raises TypeError for a model whose loss scale_fast cannot compute exactly (naming why) and
    ValueError for an unknown or unavailable backend. Applying again replaces the backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    param = next(model.parameters(), None)
    resolve_backend(backend, param.device if param is not None else torch.device("cpu"))
    if "_scale_fast" in model.__dict__:
        revert(model)
    name = type(model).__name__
    previous = model.__dict__.get("forward")  # an instance-level forward set before us (kept, restored)
    if name in CONTRASTIVE:
        _check_contrastive(model)
        model._scale_fast = _Patch(backend, previous, loss_function=None)
        model.forward = types.MethodType(_forward_of(type(model), _contrastive_forward), model)
        return model
    _check_causal_lm(model)
    head_previous = model.lm_head.__dict__.get("forward")
    model._scale_fast = _Patch(backend, previous, loss_function=model.__dict__.get("_loss_function"),
                               head_forward=head_previous)
    model.loss_function = functools.partial(_causal_lm_loss, backend=backend)
    model.lm_head.forward = functools.partial(_head_forward, model.lm_head, head_previous)
    model.forward = types.MethodType(_forward_of(type(model), _causal_forward), model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo apply(model): the original forward (and lm_head, loss_function) again; returns the model."""
    patch = model.__dict__.get("_scale_fast")
    if patch is None:
        raise ValueError(f"revert: this {type(model).__name__} is not patched by scale_fast (apply was not called)")
    del model._scale_fast
    _restore(model, "forward", patch.previous)
    if type(model).__name__ not in CONTRASTIVE:
        _restore(model, "_loss_function", patch.loss_function)
        _restore(model.lm_head, "forward", patch.head_forward)
        model.lm_head.__dict__.pop("_scale_fast_defer", None)
    return model


@contextmanager
def patched(model: nn.Module, *, backend: str = "auto"):
    """``with patched(model): ...`` -- apply(model) inside the block, revert(model) after it."""
    apply(model, backend=backend)
    try:
        yield model
    finally:
        revert(model)


class _Patch:
    """What apply() changed on one model: the backend, and what revert() puts back."""

    def __init__(self, backend, previous, loss_function, head_forward=None):
        self.backend, self.previous, self.loss_function = backend, previous, loss_function
        self.head_forward = head_forward  # an instance-level lm_head.forward set before us (e.g. a device hook)

    def original(self, model):
        """The forward apply() found: an earlier instance-level one, or the class's."""
        return self.previous or types.MethodType(type(model).forward, model)


@functools.lru_cache(maxsize=None)
def _forward_of(cls, body):
    """`body` under the name, docstring and signature of cls.forward (the Trainer reads the signature
    to choose the dataset columns it passes, and whether the model takes num_items_in_batch)."""
    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return body(self, *args, **kwargs)
    return forward


def _restore(module: nn.Module, attr: str, value) -> None:
    if value is None:
        module.__dict__.pop(attr, None)
    else:
        module.__dict__[attr] = value


# ---------------------------------------------------------------- CLIP / SigLIP


def _check_contrastive(model) -> None:
    args = list(inspect.signature(type(model).forward).parameters)
    if args != _CONTRASTIVE_ARGS:
        raise TypeError(f"{type(model).__name__}.forward{tuple(args)} is not the one scale_fast serves "
                        f"{tuple(_CONTRASTIVE_ARGS)}: another transformers version (need >=5.0)")


def _contrastive_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                         return_loss=None, interpolate_pos_encoding=False, *, keep_logits=False, **kwargs):
    patch = self._scale_fast
    if keep_logits or not (self.training and return_loss):
        return patch.original(self)(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                    position_ids=position_ids, return_loss=return_loss,
                                    interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    return_dict = self.config.return_dict if return_dict is None else return_dict
    vision = self.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                     return_dict=True, **kwargs)
    text = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  return_dict=True, **kwargs)
    text_raw = text.pooler_output
    image_raw = vision.pooler_output.to(text_raw.device)
    form, output_class = CONTRASTIVE[type(self).__name__]
    bias = self.logit_bias.to(text_raw.device) if form == "siglip" else None
    # the loss normalises its inputs itself: the model's normalise-then-dot, without the B x B logits
    loss = multi_pair_info_nce([text_raw, image_raw], logit_scale=self.logit_scale.to(text_raw.device).exp(),
                               form=form, logit_bias=bias, backend=patch.backend)[0, 1]
    out = getattr(inspect.getmodule(type(self)), output_class)(
        loss=loss.to(text_raw.dtype),
        text_embeds=text_raw / text_raw.norm(p=2, dim=-1, keepdim=True),
        image_embeds=image_raw / image_raw.norm(p=2, dim=-1, keepdim=True),
        text_model_output=text, vision_model_output=vision)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------- causal LMs


def _check_causal_lm(model) -> None:
    name = type(model).__name__
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        served = ", ".join(CONTRASTIVE)
        raise TypeError(f"scale_fast has no loss for {name}: it serves {served} and causal LMs whose lm_head "
                        f"is a torch.nn.Linear (lm_head here: {type(head).__name__})")
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise TypeError(f"{name} computes its loss with {getattr(loss_function, '__name__', loss_function)}, "
                        "not transformers' ForCausalLMLoss: scale_fast cannot compute it")
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        for attr, why in UNSERVED.items():
            if getattr(config, attr, None):
                raise TypeError(f"{name}: {why} ({attr}={getattr(config, attr)}) is not computed by "
                                "scale_fast's linear_cross_entropy")


def _causal_forward(self, *args, keep_logits=False, **kwargs):
    original = self._scale_fast.original(self)
    if keep_logits or not self.training or not _has_labels(original, args, kwargs):
        return original(*args, **kwargs)
    head = self.lm_head
    head._scale_fast_defer = True
    try:
        out = original(*args, **kwargs)
        if head._scale_fast_defer:
            raise TypeError(f"{type(self).__name__} computes its logits without calling its lm_head: "
                            "scale_fast cannot compute its loss")
    finally:
        head._scale_fast_defer = False
    values = out if isinstance(out, tuple) else out.values()
    deferred = [v for v in values if isinstance(v, DeferredLogits)]
    if any(not d.record["used"] for d in deferred):
        raise TypeError(f"{type(self).__name__} did not hand its logits to its loss_function: "
                        "scale_fast cannot compute its loss")
    if isinstance(out, tuple):
        return tuple(v for v in out if not isinstance(v, DeferredLogits))
    return type(out)(**{k: v for k, v in out.items() if not isinstance(v, DeferredLogits)})


def _has_labels(forward, args, kwargs) -> bool:
    if kwargs.get("shift_labels") is not None:
        return True
    try:
        return inspect.signature(forward).bind(*args, **kwargs).arguments.get("labels") is not None
    except TypeError:  # let the model's own forward report its arguments
        return False


def _head_forward(self, previous, hidden):
    """lm_head inside a patched training forward: no logits, the hidden states and weights instead;
    elsewhere the head's own forward (`previous`: an instance-level one it had before apply)."""
    if self.__dict__.get("_scale_fast_defer"):
        self._scale_fast_defer = False
        return DeferredLogits(hidden, self.weight, self.bias)
    return previous(hidden) if previous is not None else type(self).forward(self, hidden)


def _causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                    *, backend="auto", **kwargs):
    """transformers' ForCausalLMLoss (shift by one, sum / num_items_in_batch when given), by linear_cross_entropy."""
    if not isinstance(logits, DeferredLogits):  # the original forward (eval, keep_logits=True)
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    logits.record["used"] = True
    hidden = logits.hidden.reshape(-1, logits.hidden.shape[-1])
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels hold {target.shape[0]} positions but the model's logits {hidden.shape[0]} "
                         f"(labels shape {tuple(shift_labels.shape)}, logits {tuple(logits.shape)})")
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, logits.weight, target, logits.bias, ignore_index=ignore_index,
                                scale=logits.scale, reduction=reduction, backend=backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _unsupported(op: str) -> TypeError:
    return TypeError(f"this model applies {op} to its logits before the loss (final-logit softcapping, z-loss "
                     "or another transform): scale_fast computes only scalar multiples of them; revert(model)")


class DeferredLogits:
    """What lm_head returns inside a patched training forward: its input and weights, and the product of
    the scalar factors the model then multiplies the logits by (linear_cross_entropy's `scale`). Any
    other use of the logits raises: the loss would not be the model's."""

    def __init__(self, hidden, weight, bias, scale=None, record=None):
        self.hidden, self.weight, self.bias, self.scale = hidden, weight, bias, scale
        self.record = {"used": False} if record is None else record  # shared with the scaled copies

    @property
    def shape(self):
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def dtype(self):
        return self.hidden.dtype

    @property
    def device(self):
        return self.hidden.device

    def times(self, factor, op: str) -> "DeferredLogits":
        if isinstance(factor, torch.Tensor) and factor.numel() == 1 and factor.is_floating_point():
            factor = factor.reshape(()).to(self.hidden.device)
        elif isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise _unsupported(f"{op} by a {type(factor).__name__}")
        scale = factor if self.scale is None else self.scale * factor
        return DeferredLogits(self.hidden, self.weight, self.bias, scale, self.record)

    def __mul__(self, factor):
        return self.times(factor, "multiplication")

    __rmul__ = __mul__

    def __truediv__(self, divisor):
        if isinstance(divisor, torch.Tensor):
            return self.times(divisor.reciprocal(), "division")
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
            return self.times(1.0 / divisor, "division")
        raise _unsupported(f"division by a {type(divisor).__name__}")

    def float(self):  # casts: the loss is computed in float32 (float64 for float64 models) anyway
        return self

    def to(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _unsupported(f"`.{name}`")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("mul", "__mul__", "__rmul__") and len(args) == 2 and not kwargs:
            mine, other = (args[0], args[1]) if isinstance(args[0], cls) else (args[1], args[0])
            if not isinstance(other, cls):
                return mine.times(other, "multiplication")
        if name in ("div", "__truediv__") and len(args) == 2 and not kwargs and isinstance(args[0], cls):
            return args[0] / args[1]
        raise _unsupported(f"torch.{name}")
