"""Contrastive ops: ntxent and clip forms, M=2 (plain pair loss) and M=5 (SCALE: S' harmonized,
modalities missing), against the naive materialized loss, OpenCLIP's ClipLoss and Inf-CL."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

from . import naive
from .op import Impl, Op, cuda_peer, low_precision, memory_limit, scale_fast_impls

LOGIT_SCALE = naive.LOGIT_SCALE
PRESENT_RATES = [1.0, 0.95, 0.8, 0.3, 0.2]   # text, image, table, video, audio
F64_REFERENCE_BYTES = 2 * 2 ** 30            # above: the reference runs in float32


def dims(tier: str, device: str) -> int:
    return 64 if tier == "quick" else (512 if device.startswith("cuda") else 256)


def import_clip_loss():
    """open_clip.loss.ClipLoss; when open_clip's __init__ fails (it imports its model zoo),
    its loss module alone."""
    try:
        from open_clip.loss import ClipLoss
        return ClipLoss
    except Exception as exc:  # noqa: BLE001
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("not installed (pip install open_clip_torch)") from exc
        path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
        s2 = importlib.util.spec_from_file_location("open_clip_loss_only", path)
        mod = importlib.util.module_from_spec(s2)
        s2.loader.exec_module(mod)
        return mod.ClipLoss


def contrastive_op(form: str, M: int) -> Op:
    harmonize = M > 2

    def make_inputs(B, device, tier):
        g = torch.Generator().manual_seed(1234 + B)
        emb = torch.randn(M, B, dims(tier, device), generator=g)
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
                return lambda: sf.scale_loss(e, p, logit_scale=LOGIT_SCALE, form=form, backend=be).total
            return lambda: sf.multi_pair_info_nce(e, p, logit_scale=LOGIT_SCALE, form=form, backend=be).sum()
        return build

    def naive_fn(inp):
        e, p = inp["emb"], inp["present"]
        w = naive.scores_sample(naive.normalize(e, p), p) if harmonize else None
        return naive.contrastive(e, p, form=form, weights=w)

    def naive_bytes(inp, elem_bytes):
        return naive.contrastive_bytes(inp["present"], elem_bytes, form)

    def reference(inp):
        """The naive loss where it fits in memory, else the row-chunked one."""
        if naive_bytes(inp, inp["emb"].element_size()) <= memory_limit(inp["emb"].device.type):
            return naive_fn(inp)
        return naive.contrastive_chunked(inp["emb"], inp["present"], form=form, harmonize=harmonize)

    def naive_fits(inp, device):
        need, limit = naive_bytes(inp, inp["emb"].element_size()), memory_limit(device)
        return None if need <= limit else f"needs ~{need / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"

    def impls(device) -> List[Impl]:
        out = scale_fast_impls(device, sf_build)
        out.append(Impl("naive torch", "naive", lambda inp: (lambda: naive_fn(inp)), fits=naive_fits))
        if form == "clip" and M == 2:
            try:
                crit = import_clip_loss()()

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

    what = (f"`sf.scale_loss(...).total` (form {form}, S' harmonized, sample mode, modalities missing at rates "
            f"{PRESENT_RATES})" if harmonize else
            f"`sf.multi_pair_info_nce(..., form='{form}')` (all present, no weights)")
    return Op(
        name=f"contrastive_{form}_m{M}", title=f"contrastive loss, form {form}, M={M}", xname="B",
        sizes={"quick": [128, 256, 512, 1024], "cpu": [512, 1024, 2048, 4096], "cuda": [4096, 8192, 16384, 32768]},
        make_inputs=make_inputs, impls=impls, reference={"default": reference}, flops=flops, mm_shape=mm_shape,
        ref_dtype=ref_dtype,
        describe=lambda tier, device: f"{what}, D={dims(tier, device)}, "
                                      f"{str(low_precision(device)).replace('torch.', '')}, fwd+bwd (gradient of the "
                                      "embeddings); logit scale 1/0.07; useful FLOPs Σ over pairs 6(2n)²D (ntxent) or "
                                      "6n²D (clip)")


def ops() -> List[Op]:
    return [contrastive_op("ntxent", 2), contrastive_op("clip", 2), contrastive_op("ntxent", 5),
            contrastive_op("clip", 5)]
