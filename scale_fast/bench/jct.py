"""The Joint Co-Transformer's ways of handling absent modalities, fwd+bwd on synthetic products:
"drop" (absent and padding tokens removed: scale_fast), "mask" (kept, masked out of attention)
and "zero" (the paper's zero imputation: absent tokens attended), and xformers where installed."""
from __future__ import annotations

import copy
from typing import List

import torch

from .op import Impl, Op, cuda_peer

# (dim, layers, heads) per tier; "quick" is the JCT of `scale-fast pretrain`, "cuda" SCALE's
DIMS = {"quick": (64, 2, 2), "cpu": (256, 2, 4), "cuda": (768, 6, 8)}


def jct_op() -> Op:
    def make_inputs(B, device, tier):
        from scale_fast.data import SyntheticProducts, collate
        from scale_fast.model import MODALITIES, JointCoTransformer, SCALEConfig

        cfg = SCALEConfig.tiny()
        data = SyntheticProducts(B, seed=4242, world_seed=0, config=cfg)
        batch = collate([data[i] for i in range(len(data))], cfg)
        dim, depth, heads = DIMS[tier]
        torch.manual_seed(0)
        jct = JointCoTransformer(dim, depth, heads, [cfg.seq_len(m) for m in MODALITIES], mlp_ratio=2.0,
                                 attention="sdpa").to(device)
        g = torch.Generator().manual_seed(0)
        inp = {"module": jct, "present": batch.present.to(device), "valid": [], "leaves": [],
               "float_consts": ["proj"]}
        for i, m in enumerate(MODALITIES):
            v = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch.valid(m)], dim=1).to(device)
            inp["valid"].append(v)
            inp[f"tok{i}"] = torch.randn(B, v.shape[1], dim, generator=g).to(device).requires_grad_(True)
            inp["leaves"].append(f"tok{i}")
        inp["proj"] = torch.randn(dim, generator=g).to(device)
        return inp

    def loss(inp, missing, module=None):
        jct = module or inp["module"]
        out = jct([inp[k] for k in inp["leaves"]], inp["valid"], inp["present"], missing=missing)
        # outputs at the kept tokens (present modality, not padding): "drop" and "mask" give the same values
        return sum(((o @ inp["proj"].to(o.dtype)) * (v & inp["present"][m][:, None])).sum()
                   for m, (o, v) in enumerate(zip(out.tokens, inp["valid"])))

    def impls(device) -> List[Impl]:
        out = [Impl("JCT drop (scale_fast, sdpa)", "scale_fast", lambda inp: (lambda: loss(inp, "drop")), ref="mask"),
               Impl("JCT mask (naive: masked attention)", "naive", lambda inp: (lambda: loss(inp, "mask")), ref="mask"),
               Impl("JCT zero (paper: zero imputation)", "naive", lambda inp: (lambda: loss(inp, "zero")), ref="zero")]
        why = cuda_peer("xformers", "xformers", device)
        for mode in ("drop", "zero"):
            def build_x(inp, mode=mode):
                mod = copy.deepcopy(inp["module"])
                mod.set_attention("xformers")
                return lambda: loss(inp, mode, mod)
            out.append(Impl(f"JCT {mode} (xformers)", "peer", None if why else build_x, skip=why,
                            ref="mask" if mode == "drop" else "zero"))
        return out

    def tokens(inp):
        """B x T, T the concatenated padded length: the tokens "zero" processes."""
        return "tokens", float(sum(v.numel() for v in inp["valid"]))

    return Op(
        name="jct", title="Joint Co-Transformer attention paths (drop vs mask vs zero)", xname="B",
        sizes={"quick": [8, 16, 32, 64], "cpu": [32, 64, 128, 256], "cuda": [64, 128, 256, 512]},
        make_inputs=make_inputs, impls=impls, work=tokens, baseline="naive",
        reference={"mask": lambda inp: loss(inp, "mask"), "zero": lambda inp: loss(inp, "zero")},
        describe=lambda tier, device: "JointCoTransformer (dim, layers, heads) = {} on a batch of synthetic products "
                                      "(text 100%, image 85%, table 80%, video 30%, audio 20% present), float32, "
                                      "fwd+bwd of a projection of the kept tokens' outputs; drop/mask are checked "
                                      "against a float64 mask run, zero against a float64 zero run (it computes "
                                      "another function); tokens/s = B x T (padded) / time".format(DIMS[tier]))


def ops() -> List[Op]:
    return [jct_op()]
