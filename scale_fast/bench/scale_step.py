"""One full SCALELoss step: M=5 harmonized contrastive pairs plus MLM on text and MRP classes on
image, against the naive materialized equivalent."""
from __future__ import annotations

import itertools
from typing import List

import torch

from . import naive
from .contrastive import PRESENT_RATES
from .op import Impl, Op, low_precision, scale_fast_impls


def dims(tier: str, device: str):
    """(D, text vocabulary, image classes)."""
    if tier == "quick":
        return 64, 2048, 256
    return (512 if device.startswith("cuda") else 256), 21128, 1601


def scale_step_op() -> Op:
    def make_inputs(B, device, tier):
        D, Kt, Ki = dims(tier, device)
        g = torch.Generator().manual_seed(77 + B)
        emb = torch.randn(5, B, D, generator=g)
        present = torch.rand(5, B, generator=g) < torch.tensor(PRESENT_RATES)[:, None]
        present[0] |= ~present.any(0)
        Nt, Ni = 4 * B, 2 * B
        img = torch.nonzero(present[1]).flatten()
        idx_t = torch.randint(0, B, (Nt,), generator=g)
        idx_i = img[torch.randint(0, img.numel(), (Ni,), generator=g)]
        dt = low_precision(device)

        def leaf(x):
            return x.to(device=device, dtype=dt).requires_grad_(True)
        return {"emb": leaf(emb), "present": present.to(device),
                "h_text": leaf(torch.randn(Nt, D, generator=g)), "w_text": leaf(torch.randn(Kt, D, generator=g) * D ** -0.5),
                "y_text": torch.randint(0, Kt, (Nt,), generator=g).to(device), "i_text": idx_t.to(device),
                "h_img": leaf(torch.randn(Ni, D, generator=g)), "w_img": leaf(torch.randn(Ki, D, generator=g) * D ** -0.5),
                "y_img": torch.randint(0, Ki, (Ni,), generator=g).to(device), "i_img": idx_i.to(device),
                "leaves": ["emb", "h_text", "w_text", "h_img", "w_img"]}

    def sf_build(be):
        import scale_fast as sf

        def build(inp):
            fn = sf.SCALELoss(backend=be).to(inp["emb"].device)

            def f():
                tasks = {"text": sf.MaskedTask("ce", inp["h_text"], inp["y_text"], weight=inp["w_text"],
                                               sample_index=inp["i_text"]),
                         "image": sf.MaskedTask("ce", inp["h_img"], inp["y_img"], weight=inp["w_img"],
                                                sample_index=inp["i_img"])}
                return fn(inp["emb"], inp["present"], tasks=tasks).total
            return f
        return build

    def naive_fn(inp):
        e, p = inp["emb"], inp["present"]
        w = naive.scores_sample(naive.normalize(e, p), p)
        total = naive.contrastive(e, p, form="ntxent", weights=w)
        total = total + naive.linear_ce(inp["h_text"], inp["w_text"], inp["y_text"], w[inp["i_text"], 0, 0])
        return total + naive.linear_ce(inp["h_img"], inp["w_img"], inp["y_img"], w[inp["i_img"], 1, 1])

    def impls(device) -> List[Impl]:
        return scale_fast_impls(device, sf_build) + [Impl("naive torch", "naive", lambda inp: (lambda: naive_fn(inp)))]

    def flops(inp):
        p, D = inp["present"].cpu(), inp["emb"].shape[-1]
        c = sum(24 * int((p[i] & p[j]).sum()) ** 2 * D for i, j in itertools.combinations(range(5), 2))
        return float(c + 6 * D * (inp["h_text"].shape[0] * inp["w_text"].shape[0]
                                  + inp["h_img"].shape[0] * inp["w_img"].shape[0]))

    return Op(
        name="scale_loss_step", title="one full SCALELoss step", xname="B",
        sizes={"quick": [64, 128, 256], "cpu": [256, 512, 1024, 2048], "cuda": [2048, 4096, 8192, 16384]},
        make_inputs=make_inputs, impls=impls, reference={"default": naive_fn}, flops=flops,
        mm_shape=lambda inp: (inp["h_text"].shape[0], inp["emb"].shape[-1], inp["w_text"].shape[0]),
        describe=lambda tier, device: "`sf.SCALELoss()(emb, present, tasks).total`: M=5 (missing as in the contrastive "
                                      "ops), ntxent, S' harmonized, MLM on text (4B rows, vocabulary {1}) and MRP "
                                      "classes on image (2B rows, {2} classes), D={0}, {3}, fwd+bwd (all 5 inputs' "
                                      "gradients)".format(*dims(tier, device),
                                                          str(low_precision(device)).replace("torch.", "")))


def ops() -> List[Op]:
    return [scale_step_op()]
