"""OpenCLIP's ClipLoss, SigLipLoss and CoCaLoss computed by scale_fast (docs/open_clip.md).

    from scale_fast.integrations import open_clip as sf_open_clip
    sf_open_clip.patch()          # or: with sf_open_clip.patched(): ...
    loss = open_clip.create_loss(args)

While patched, ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` / ``CoCaLoss`` -- and every module's
name bound to them (``open_clip``, ``open_clip.factory``, which ``create_loss`` reads, a training
script's own imports) -- are subclasses of the originals: the same constructor, forward signature,
return values and attributes (``get_logits`` still forms the logits if called), but the loss never
forms the B x B (or local x global) logits: the pair loss is ``scale_fast.multi_pair_info_nce`` on the
features as given (``normalize=False``).  Per rank, values and gradients equal OpenCLIP's for every
flag:

- ClipLoss ``local_loss`` x ``gather_with_grad`` (world size W, equal local batches as OpenCLIP's
  gather needs): local_loss=False gives the global loss on every rank and the gradient of the global
  loss on the local features (x W with gather_with_grad=True, as OpenCLIP's all_gather backward sums
  W copies); local_loss=True gives W x the rank's share (its rows against every column, over the
  local batch); gather_with_grad=False there holds every column constant.  logit_scale gets the
  gradient OpenCLIP gives it on each rank.  ``logit_bias`` (a constant on every logit: no effect on
  the softmax) is accepted, its gradient exactly 0 and it stays in the graph.
- SigLipLoss: any ``dist_impl`` (the fused row-range op replaces its neighbour exchange; the
  value and gradients are those of every implementation).
- CoCaLoss: its contrastive part (its caption loss is OpenCLIP's).
- ``use_horovod=True`` raises ValueError (scale_fast runs on torch.distributed).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .._dispatch import BACKENDS
from ..functional import multi_pair_info_nce

NAMES = ("ClipLoss", "SigLipLoss", "CoCaLoss")


class _State:
    backend: Optional[str] = None  # None: not patched
    bindings: List[Tuple[object, str, type]] = []  # (module, name, the original it held)


_state = _State()


def _open_clip_loss():
    try:
        return importlib.import_module("open_clip.loss")
    except ImportError as exc:
        raise ImportError(f"scale_fast.integrations.open_clip needs open_clip (pip install open_clip_torch): {exc}") \
            from exc


def _world(loss):
    """The process group of a loss built with world_size > 1 (torch.distributed's default), else None."""
    if loss.world_size <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={loss.world_size} needs an initialised torch.distributed process group")
    if dist.get_world_size() != loss.world_size or dist.get_rank() != loss.rank:
        raise ValueError(f"rank={loss.rank}, world_size={loss.world_size} do not match torch.distributed's "
                         f"rank {dist.get_rank()} of {dist.get_world_size()}")
    return dist.group.WORLD


def _scalar(x):
    """A 0-dim logit scale or bias (OpenCLIP's are 0-dim parameters; a [1] tensor is accepted too)."""
    return x.reshape(()) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.numel() == 1 else x


def _global_value(share: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's share as the value, the gradient flowing into this rank's share only."""
    import torch.distributed as dist
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return total + (share - share.detach())


def _grad_times(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x (bit for bit), whose gradient is multiplied by factor."""
    return x.detach() + (x - x.detach()) * factor


def _clip_value(loss, image_features, text_features, logit_scale, logit_bias, form: str) -> torch.Tensor:
    """OpenCLIP's per-rank ClipLoss (form="clip") or SigLipLoss (form="siglip") value, with its gradients."""
    group = _world(loss)
    s = _scalar(logit_scale)
    bias = _scalar(logit_bias) if form == "siglip" else None
    run = functools.partial(multi_pair_info_nce, form=form, backend=loss.scale_fast_backend, normalize=False,
                            logit_bias=bias)
    if group is None:
        value = run(torch.stack([image_features, text_features]), logit_scale=s)[0, 1]
    elif form == "siglip" or loss.local_loss:
        # W x this rank's share: the loss of its rows against every column, over its local batch
        with_grad = form == "siglip" or loss.gather_with_grad
        e = torch.stack([image_features, text_features])
        share = run(e, logit_scale=s, process_group=group, gather_with_grad=with_grad, partial=True)[0, 1]
        value = loss.world_size * share
    else:
        # the global loss on every rank, whose gradient on the rank's features is that of the global
        # loss (x W when OpenCLIP gathers with gradient), on logit_scale that of the global loss
        from ..distributed import sum_grads
        e = torch.stack([image_features, text_features])
        if loss.gather_with_grad:
            e = _grad_times(e, float(loss.world_size))
        s_all = sum_grads(s, group) if isinstance(s, torch.Tensor) and s.requires_grad else s
        share = run(e, logit_scale=s_all, process_group=group, partial=True)[0, 1]
        value = _global_value(share, group)
    if form == "clip" and isinstance(logit_bias, torch.Tensor):
        value = value + 0.0 * logit_bias.sum()  # a constant logit: no effect, in the graph for DDP
    return value


def _check_horovod(loss) -> None:
    if getattr(loss, "use_horovod", False):
        raise ValueError("use_horovod=True: scale_fast's OpenCLIP losses run on torch.distributed, not Horovod "
                         "(unpatch() to use OpenCLIP's own loss)")


def _subclasses(mod) -> Dict[str, type]:
    """scale_fast-backed subclasses of the installed open_clip.loss classes, built once per class."""
    cached = getattr(mod, "_scale_fast_subclasses", None)
    if cached is not None and all(cached[n].__mro__[1] is _original(mod, n) for n in cached):
        return cached
    OrigClip, OrigSigLip, OrigCoCa = (_original(mod, n) for n in NAMES)
    clip_forward = inspect.signature(OrigClip.forward)
    siglip_forward = inspect.signature(OrigSigLip.forward)

    def init_with(orig):
        def __init__(self, *args, **kwargs):
            orig.__init__(self, *args, **kwargs)
            _check_horovod(self)
            self.scale_fast_backend = _state.backend or "auto"
        __init__.__signature__ = inspect.signature(orig.__init__)
        __init__.__doc__ = orig.__init__.__doc__
        return __init__

    def forward_with(signature, form):
        def forward(self, *args, **kwargs):
            a = signature.bind(self, *args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            value = _clip_value(self, a["image_features"], a["text_features"], a["logit_scale"], a.get("logit_bias"),
                                form)
            return {"contrastive_loss": value} if a.get("output_dict") else value
        forward.__signature__ = signature
        return forward

    ClipLoss = type("ClipLoss", (OrigClip,), {
        "__init__": init_with(OrigClip), "forward": forward_with(clip_forward, "clip"), "__module__": __name__,
        "__doc__": f"open_clip's ClipLoss computed by scale_fast (see {__name__}).\n\n{OrigClip.__doc__ or ''}"})
    SigLipLoss = type("SigLipLoss", (OrigSigLip,), {
        "__init__": init_with(OrigSigLip), "forward": forward_with(siglip_forward, "siglip"), "__module__": __name__,
        "__doc__": f"open_clip's SigLipLoss computed by scale_fast (see {__name__}).\n\n{OrigSigLip.__doc__ or ''}"})
    # CoCaLoss.forward calls super().forward: with the patched ClipLoss next in the MRO that is scale_fast's
    CoCaLoss = type("CoCaLoss", (OrigCoCa, ClipLoss), {
        "__init__": init_with(OrigCoCa), "__module__": __name__,
        "__doc__": f"open_clip's CoCaLoss, its contrastive part computed by scale_fast (see {__name__})."})
    mod._scale_fast_subclasses = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss, "CoCaLoss": CoCaLoss}
    return mod._scale_fast_subclasses


def _original(mod, name: str) -> type:
    """The class open_clip.loss defines under name (even while it is patched)."""
    for module, bound, orig in _state.bindings:
        if module is mod and bound == name:
            return orig
    return getattr(mod, name)


def patch(backend: str = "auto") -> None:
    """From now on open_clip builds scale_fast-backed ClipLoss / SigLipLoss / CoCaLoss (see the module doc).

    backend: the scale_fast backend of the losses built while patched ("auto", "torch", "cpp",
    "triton").  Patching again only changes the backend.  Losses built before keep their class.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mod = _open_clip_loss()
    if _state.backend is not None:
        _state.backend = backend
        return
    originals = {name: getattr(mod, name) for name in NAMES}
    replacements = _subclasses(mod)
    bindings = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, orig in originals.items():
            if namespace.get(name) is orig:
                bindings.append((module, name, orig))
    for module, name, _ in bindings:
        setattr(module, name, replacements[name])
    _state.bindings, _state.backend = bindings, backend


def unpatch() -> None:
    """Every name patch() rebound holds its original class again (a no-op when not patched)."""
    for module, name, orig in reversed(_state.bindings):
        setattr(module, name, orig)
    _state.bindings, _state.backend = [], None


def is_patched() -> bool:
    return _state.backend is not None


@contextlib.contextmanager
def patched(backend: str = "auto"):
    """patch(backend) for the duration of a with block; on exit the state before it (unpatched, or
    patched with its backend) comes back, also after an exception."""
    before = _state.backend
    patch(backend)
    try:
        yield
    finally:
        if before is None:
            unpatch()
        else:
            _state.backend = before


__all__ = ["patch", "unpatch", "patched", "is_patched"]
