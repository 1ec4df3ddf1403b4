"""Contrastive ops: ntxent, clip and siglip forms, M=2 (plain pair loss) and M=5 (SCALE: S'
harmonized, modalities missing), against the naive materialized loss, OpenCLIP's ClipLoss and
SigLipLoss, and Inf-CL."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..functional import SIGLIP_LOGIT_BIAS, SIGLIP_LOGIT_SCALE   # OpenCLIP's SigLIP initialisation
from . import naive
from .op import Impl, Op, cuda_peer, low_precision, memory_limit, scale_fast_impls

LOGIT_SCALE = naive.LOGIT_SCALE
PRESENT_RATES = [1.0, 0.95, 0.8, 0.3, 0.2]   # text, image, table, video, audio
F64_REFERENCE_BYTES = 2 * 2 ** 30            # above: the reference runs in float32


def dims(tier: str, device: str) -> int:
    return 64 if tier == "quick" else (512 if device.startswith("cuda") else 256)


def import_open_clip_loss(name: str = "ClipLoss"):
    """open_clip.loss.<name> (ClipLoss, SigLipLoss); when open_clip's __init__ fails (it imports
    its model zoo), its loss module alone."""
    try:
        import open_clip.loss as mod
    except Exception as exc:  # noqa: BLE001
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("not installed (pip install open_clip_torch)") from exc
        path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
        s2 = importlib.util.spec_from_file_location("open_clip_loss_only", path)
        mod = importlib.util.module_from_spec(s2)
        s2.loader.exec_module(mod)
    return getattr(mod, name)


def contrastive_op(form: str, M: int, dim: Optional[int] = None) -> Op:
    """Form `form` at M modalities; dim: the embedding width (default: the tier's, see dims)."""
    harmonize = M > 2
    siglip = form == "siglip"
    scale = SIGLIP_LOGIT_SCALE if siglip else LOGIT_SCALE
    bias = {"logit_bias": SIGLIP_LOGIT_BIAS} if siglip else {}   # only siglip takes a bias

    def make_inputs(B, device, tier):
        g = torch.Generator().manual_seed(1234 + B)
        emb = torch.randn(M, B, dim or dims(tier, device), generator=g)
        rates = torch.tensor(PRESENT_RATES[:M] if harmonize else [1.0] * M)[:, None]
        present = torch.rand(M, B, generator=g) < rates
        present[0] |= ~present.any(0)
        return {"emb": emb.to(device=device, dtype=low_precision(device)).requires_grad_(True),
                "present": present.to(device), "leaves": ["emb"]}

    def sf_build(be):
        import scale_fast as sf

        def build(inp):
            e, p = inp["emb"], inp["present"]
            if harmonize:
                return lambda: sf.scale_loss(e, p, logit_scale=scale, form=form, backend=be, **bias).total
            return lambda: sf.multi_pair_info_nce(e, p, logit_scale=scale, form=form, backend=be, **bias).sum()
        return build

    def naive_fn(inp):
        e, p = inp["emb"], inp["present"]
        w = naive.scores_sample(naive.normalize(e, p), p) if harmonize else None
        return naive.contrastive(e, p, form=form, weights=w, logit_scale=scale, **bias)

    def naive_bytes(inp, elem_bytes):
        return naive.contrastive_bytes(inp["present"], elem_bytes, form)

    def reference(inp):
        """The naive loss where it fits in memory, else the row-chunked one."""
        if naive_bytes(inp, inp["emb"].element_size()) <= memory_limit(inp["emb"].device.type):
            return naive_fn(inp)
        return naive.contrastive_chunked(inp["emb"], inp["present"], form=form, harmonize=harmonize,
                                         logit_scale=scale, **bias)

    def naive_fits(inp, device):
        need, limit = naive_bytes(inp, inp["emb"].element_size()), memory_limit(device)
        return None if need <= limit else f"needs ~{need / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"

    def impls(device) -> List[Impl]:
        out = scale_fast_impls(device, sf_build, op="siglip" if siglip else "contrastive")
        out.append(Impl("naive torch", "naive", lambda inp: (lambda: naive_fn(inp)), fits=naive_fits))
        if form == "clip" and M == 2:
            try:
                crit = import_open_clip_loss("ClipLoss")()

                def build_oc(inp):
                    e = inp["emb"]
                    return lambda: crit(F.normalize(e[0], dim=-1), F.normalize(e[1], dim=-1), LOGIT_SCALE)
                out.append(Impl("OpenCLIP ClipLoss", "peer", build_oc))
            except ImportError as exc:
                out.append(Impl("OpenCLIP ClipLoss", "peer", skip=str(exc)))
            why = cuda_peer("inf_cl", "inf-cl", device)

            def build_ic(inp):
                from inf_cl import cal_inf_loss
                e = inp["emb"]

                def f():   # both directions, averaged (it casts to float32 and uses TF32)
                    a, b = F.normalize(e[0], dim=-1), F.normalize(e[1], dim=-1)
                    return 0.5 * (cal_inf_loss(LOGIT_SCALE * a, b) + cal_inf_loss(LOGIT_SCALE * b, a))
                return f
            out.append(Impl("Inf-CL cal_inf_loss", "peer", None if why else build_ic, skip=why))
        if siglip and M == 2:
            try:
                crit_sig = import_open_clip_loss("SigLipLoss")()

                def build_os(inp):   # normalized features, the exponentiated scale, the bias
                    e = inp["emb"]
                    return lambda: crit_sig(F.normalize(e[0], dim=-1), F.normalize(e[1], dim=-1), scale,
                                            SIGLIP_LOGIT_BIAS)
                out.append(Impl("OpenCLIP SigLipLoss", "peer", build_os))
            except ImportError as exc:
                out.append(Impl("OpenCLIP SigLipLoss", "peer", skip=str(exc)))
        return out

    def flops(inp):
        k = 6 * 4 if form == "ntxent" else 6        # one logits GEMM forward, two backward
        return float(sum(k * n * n * inp["emb"].shape[-1] for n in naive.pair_sizes(inp["present"])))

    def mm_shape(inp):
        n = max(naive.pair_sizes(inp["present"]))
        m = 2 * n if form == "ntxent" else n
        return (m, inp["emb"].shape[-1], m)

    def ref_dtype(inp):
        big = naive_bytes(inp, 8) > F64_REFERENCE_BYTES
        return torch.float32 if big else torch.float64

    logits = (f"logit scale {SIGLIP_LOGIT_SCALE:g}, bias {SIGLIP_LOGIT_BIAS:g} (OpenCLIP's SigLIP init)" if siglip
              else "logit scale 1/0.07")
    what = (f"`sf.scale_loss(...).total` (form {form}, S' harmonized, sample mode, modalities missing at rates "
            f"{PRESENT_RATES})" if harmonize else
            f"`sf.multi_pair_info_nce(..., form='{form}')` (all present, no weights)")
    return Op(
        name=f"contrastive_{form}_m{M}" + (f"_d{dim}" if dim else ""), title=f"contrastive loss, form {form}, M={M}",
        xname="B",
        sizes={"quick": [128, 256, 512, 1024], "cpu": [512, 1024, 2048, 4096], "cuda": [4096, 8192, 16384, 32768]},
        make_inputs=make_inputs, impls=impls, reference={"default": reference}, flops=flops, mm_shape=mm_shape,
        ref_dtype=ref_dtype,
        describe=lambda tier, device: f"{what}, D={dim or dims(tier, device)}, "
                                      f"{str(low_precision(device)).replace('torch.', '')}, fwd+bwd (gradient of the "
                                      f"embeddings); {logits}; useful FLOPs Σ over pairs 6(2n)²D (ntxent) or "
                                      "6n²D (clip, siglip)")


def ops() -> List[Op]:
    return [contrastive_op(form, M) for M in (2, 5) for form in ("ntxent", "clip", "siglip")]
