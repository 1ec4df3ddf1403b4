"""Fused linear cross-entropy against F.linear + F.cross_entropy, torch's F.linear_cross_entropy
(both modes, where this torch has it), Liger-Kernel and Cut Cross-Entropy."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from . import naive
from .op import Impl, Op, cuda_peer, low_precision, memory_limit, scale_fast_impls


def dims(tier: str, vocab: Optional[int] = None, hidden_dim: Optional[int] = None):
    """(K classes, H hidden): the tier's, or the given ones."""
    K, H = (4096, 128) if tier == "quick" else (21128, 768)
    return vocab or K, hidden_dim or H


def linear_ce_op(vocab: Optional[int] = None, hidden_dim: Optional[int] = None) -> Op:
    """The op at the tier's K and H, or at K=vocab / H=hidden_dim (named linear_ce_k<K>[_h<H>])."""
    def make_inputs(N, device, tier):
        K, H = dims(tier, vocab, hidden_dim)
        g = torch.Generator().manual_seed(4321)
        hidden = torch.randn(N, H, generator=g)
        weight = torch.randn(K, H, generator=g) * H ** -0.5
        target = torch.randint(0, K, (N,), generator=g)
        dt = low_precision(device)
        return {"hidden": hidden.to(device=device, dtype=dt).requires_grad_(True),
                "weight": weight.to(device=device, dtype=dt).requires_grad_(True),
                "target": target.to(device), "leaves": ["hidden", "weight"]}

    def sf_build(be):
        import scale_fast as sf
        return lambda inp: (lambda: sf.linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], backend=be))

    def naive_fn(inp):
        return naive.linear_ce(inp["hidden"], inp["weight"], inp["target"])

    def naive_fits(inp, device):
        (N, _), K = inp["hidden"].shape, inp["weight"].shape[0]
        need, limit = naive.linear_ce_bytes(N, K, inp["hidden"].element_size()), memory_limit(device)
        return None if need <= limit else f"needs ~{need / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"

    def impls(device) -> List[Impl]:
        out = scale_fast_impls(device, sf_build)
        out.append(Impl("naive torch (F.linear + F.cross_entropy)", "naive", lambda inp: (lambda: naive_fn(inp)),
                        fits=naive_fits))
        if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
            # chunked: its chunked path (float32 on CPU: acc_policy "compact", chunking "aspect_ratio:2");
            # options=None: its reference path, linear then cross_entropy
            for label, chunked in (("torch F.linear_cross_entropy (chunked options)", True),
                                   ("torch F.linear_cross_entropy (options=None)", False)):
                def build_t(inp, chunked=chunked):
                    opts = torch.nn.LinearCrossEntropyOptions() if chunked else None
                    return lambda: F.linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], options=opts)
                out.append(Impl(label, "peer", build_t))
        else:
            out.append(Impl("torch F.linear_cross_entropy", "peer",
                            skip=f"torch {torch.__version__} has no F.linear_cross_entropy"))
        why = cuda_peer("liger_kernel", "liger-kernel", device)

        def build_l(inp):
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lflce
            return lambda: lflce(inp["hidden"], inp["weight"], inp["target"])
        out.append(Impl("Liger fused_linear_cross_entropy", "peer", None if why else build_l, skip=why))
        why = cuda_peer("cut_cross_entropy", "cut-cross-entropy", device)

        def build_c(inp):
            from cut_cross_entropy import linear_cross_entropy as cce
            return lambda: cce(inp["hidden"], inp["weight"], inp["target"])
        out.append(Impl("Cut Cross-Entropy", "peer", None if why else build_c, skip=why))
        return out

    def reference(inp):  # row chunks: float64 logits of every N x K would not fit at the LLM sizes
        return naive.linear_ce_chunked(inp["hidden"], inp["weight"], inp["target"])

    name = "linear_ce" + (f"_k{vocab}" if vocab else "") + (f"_h{hidden_dim}" if hidden_dim else "")
    return Op(
        name=name, title="fused linear cross-entropy", xname="N",
        sizes={"quick": [256, 512, 1024], "cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 8192, 16384, 32768]},
        make_inputs=make_inputs, impls=impls, reference={"default": reference},
        flops=lambda inp: 6.0 * inp["hidden"].shape[0] * inp["weight"].shape[0] * inp["hidden"].shape[1],
        mm_shape=lambda inp: (inp["hidden"].shape[0], inp["hidden"].shape[1], inp["weight"].shape[0]),
        describe=lambda tier, device: "`sf.linear_cross_entropy(hidden, weight, target)`, K={}, H={}, {}, no bias, "
                                      "reduction mean, fwd+bwd (gradients of hidden and weight); Liger and CCE with "
                                      "their defaults (CCE's filter_eps skips gradient tiles below bf16 eps); useful "
                                      "FLOPs 6NKH".format(*dims(tier, vocab, hidden_dim), str(low_precision(device)).replace("torch.", "")))


def ops() -> List[Op]:
    return [linear_ce_op()]
