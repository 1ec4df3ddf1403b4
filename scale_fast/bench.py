"""`scale-fast bench`: this library's backends against naive PyTorch and the installed peers.

Self-contained (it ships with the package; the standalone scripts of ``benchmarks/`` are not
installed): the op definitions, a naive materialized PyTorch baseline of each op, the
measurement (agreement check, peak memory, median time, matmul roofline) and the report
(markdown table, CSV, PNG plots).  The standalone scripts in ``benchmarks/`` remain the
per-op deep dives (fresh process per CPU row, budgets, GPU tables); ``benchmarks/test_bench_pytest.py``
runs the ops defined here under pytest-benchmark.

Method, for each op, size and implementation:

1. inputs from a fixed seed (the same generators as ``benchmarks/bench_contrastive.py`` and
   ``bench_linear_ce.py``, so the same sizes give the same losses there and here);
2. agreement: one fwd+bwd (also the first warm-up) compared with a float64 run of the naive
   implementation (relative error of the loss and max over the gradients); an implementation that
   disagrees is reported as ``MISMATCH`` and not timed;
3. peak extra memory of one fwd+bwd: CUDA ``max_memory_allocated`` minus the allocation before
   the call; CPU growth of the process's resident-set high-water mark (VmHWM, reset through
   ``/proc/self/clear_refs``) over VmRSS before the call, with glibc's mmap threshold pinned so
   that big buffers are returned to the OS (includes the gradients);
4. time: median of ``reps`` calls after ``warmup`` untimed ones (CUDA events on GPU,
   ``perf_counter`` on CPU);
5. roofline: useful FLOPs / time against the rate of ``torch.mm`` on the op's GEMM shape,
   measured in the same run ("× mm").
"""
from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import datetime as _dt
import gc
import importlib.util
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

LOGIT_SCALE = 1 / 0.07
PRESENT_RATES = [1.0, 0.95, 0.8, 0.3, 0.2]   # text, image, table, video, audio (benchmarks/bench_contrastive.py)
_FILL = -1.0e4


# =========================================================================== naive PyTorch
def naive_normalize(e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    z = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(present[..., None], z, torch.zeros_like(z))


def naive_scores(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-sample S' [B, M, M] (sample mode), materialized."""
    zb = z.transpose(0, 1)
    S = zb @ zb.transpose(1, 2)
    pb = present.transpose(0, 1)
    act = pb[:, :, None] & pb[:, None, :]
    S = torch.where(act, S, torch.zeros_like(S))
    A = torch.softmax(torch.where(act, S, torch.full_like(S, _FILL)), dim=-1)
    R = S * torch.where(act, A, torch.zeros_like(A))
    return R / R.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def naive_contrastive(e, present, *, form: str, weights=None, logit_scale=LOGIT_SCALE):
    """Mean over active pairs of the pair losses, every pair's logits materialized."""
    M = e.shape[0]
    z = naive_normalize(e, present)
    total, count = None, 0
    for i, j in itertools.combinations(range(M), 2):
        V = torch.nonzero(present[i] & present[j]).flatten()
        n = V.numel()
        if n == 0:
            continue
        w = None if weights is None else weights[V, i, j]
        if form == "ntxent":
            u = torch.cat([z[i, V], z[j, V]])
            scale = logit_scale if w is None else logit_scale * torch.cat([w, w])[:, None]
            logits = (u @ u.t()) * scale
            logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
            r = torch.arange(2 * n, device=u.device)
            loss = F.cross_entropy(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits,
                                   (r + n) % (2 * n))
        else:
            zi, zj = z[i, V], z[j, V]
            scale = logit_scale if w is None else logit_scale * w[:, None]
            t = torch.arange(n, device=zi.device)
            l1, l2 = (zi @ zj.t()) * scale, (zj @ zi.t()) * scale
            if l1.dtype in (torch.bfloat16, torch.float16):
                l1, l2 = l1.float(), l2.float()
            loss = 0.5 * (F.cross_entropy(l1, t) + F.cross_entropy(l2, t))
        total = loss if total is None else total + loss
        count += 1
    return total / max(count, 1) if total is not None else e.sum() * 0.0


def naive_linear_ce(hidden, weight, target, row_scale=None):
    logits = F.linear(hidden, weight)
    if row_scale is not None:
        logits = logits * row_scale[:, None]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits, target)


# =========================================================================== peers
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001
        return False


def _cuda_only(module: str, pip: str, device: str) -> Optional[str]:
    if not _installed(module):
        return f"not installed (pip install {pip})"
    if not device.startswith("cuda"):
        return "installed, but runs on CUDA tensors only"
    return None


def import_clip_loss():
    """open_clip.loss.ClipLoss; if open_clip's __init__ fails, its loss module alone."""
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


# =========================================================================== ops
@dataclass
class Impl:
    name: str
    kind: str                                    # "scale_fast", "naive" or "peer"
    build: Optional[Callable[[dict], Callable[[], torch.Tensor]]] = None
    skip: Optional[str] = None                   # reason, when it cannot run here
    ref: str = "default"                         # which reference it must agree with


@dataclass
class Op:
    name: str
    title: str
    xname: str
    sizes: Dict[str, List[int]]                  # "quick", "cpu", "cuda"
    make_inputs: Callable[[int, str, str], dict]  # (x, device, tier) -> inputs
    impls: Callable[[str], List[Impl]]
    reference: Dict[str, Callable[[dict], torch.Tensor]]
    flops: Callable[[dict], Optional[float]] = lambda inp: None
    mm_shape: Callable[[dict], Optional[tuple]] = lambda inp: None
    describe: Callable[[str, str], str] = lambda tier, device: ""
    tol: float = 0.0                             # 0: by dtype


def _lowp(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _sf_impls(device: str, build_for_backend: Callable[[str], Callable]) -> List[Impl]:
    import scale_fast as sf
    out = []
    unavailable = sf.available_backends(with_reasons=True)
    for be in sf.backend_names():
        name = f"scale_fast {be}"
        if unavailable[be]:
            out.append(Impl(name, "scale_fast", skip=f"backend not available here: {unavailable[be]}"))
        elif be == "triton" and not device.startswith("cuda"):
            out.append(Impl(name, "scale_fast", skip="CUDA only (TRITON_INTERPRET emulation is not a measurement)"))
        elif be == "cpp" and device.startswith("cuda"):
            out.append(Impl(name, "scale_fast", skip="CPU tensors only"))
        else:
            out.append(Impl(name, "scale_fast", build_for_backend(be)))
    return out


# ---------------------------------------------------------------- contrastive (4 ops)
def _contrastive_op(form: str, M: int) -> Op:
    harmonize = M > 2

    def dims(tier, device):
        return 64 if tier == "quick" else (512 if device.startswith("cuda") else 256)

    def make_inputs(B, device, tier):
        D = dims(tier, device)
        g = torch.Generator().manual_seed(1234 + B)          # as benchmarks/bench_contrastive.py
        emb = torch.randn(M, B, D, generator=g)
        rates = torch.tensor(PRESENT_RATES[:M] if harmonize else [1.0] * M)[:, None]
        present = torch.rand(M, B, generator=g) < rates
        present[0] |= ~present.any(0)
        return {"emb": emb.to(device=device, dtype=_lowp(device)).requires_grad_(True),
                "present": present.to(device), "leaves": ["emb"], "D": D}

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
        w = naive_scores(naive_normalize(e, p), p) if harmonize else None
        return naive_contrastive(e, p, form=form, weights=w)

    def impls(device):
        out = _sf_impls(device, sf_build)
        out.append(Impl("naive torch", "naive", lambda inp: (lambda: naive_fn(inp))))
        if form == "clip" and M == 2:
            try:
                ClipLoss = import_clip_loss()
                crit = ClipLoss()

                def build_oc(inp):
                    e = inp["emb"]
                    return lambda: crit(F.normalize(e[0], dim=-1), F.normalize(e[1], dim=-1), LOGIT_SCALE)
                out.append(Impl("OpenCLIP ClipLoss", "peer", build_oc))
            except ImportError as exc:
                out.append(Impl("OpenCLIP ClipLoss", "peer", skip=str(exc)))
            why = _cuda_only("inf_cl", "inf-cl", device)
            if why:
                out.append(Impl("Inf-CL cal_inf_loss", "peer", skip=why))
            else:
                def build_ic(inp):
                    from inf_cl import cal_inf_loss
                    e = inp["emb"]

                    def f():
                        a, b = F.normalize(e[0], dim=-1), F.normalize(e[1], dim=-1)
                        return 0.5 * (cal_inf_loss(LOGIT_SCALE * a, b) + cal_inf_loss(LOGIT_SCALE * b, a))
                    return f
                out.append(Impl("Inf-CL cal_inf_loss", "peer", build_ic))
        return out

    def pair_ns(inp):
        p = inp["present"].cpu()
        return [int((p[i] & p[j]).sum()) for i, j in itertools.combinations(range(M), 2)]

    def flops(inp):
        D = inp["D"]
        k = 6 * 4 if form == "ntxent" else 6
        return float(sum(k * n * n * D for n in pair_ns(inp)))

    def mm_shape(inp):
        n = max(pair_ns(inp))
        m = 2 * n if form == "ntxent" else n
        return (m, inp["D"], m)

    what = (f"`sf.scale_loss(...).total` (form {form}, S' harmonized, sample mode, modalities missing at rates "
            f"{PRESENT_RATES})" if harmonize else
            f"`sf.multi_pair_info_nce(..., form='{form}')` (all present, no weights)")
    return Op(
        name=f"contrastive_{form}_m{M}", title=f"contrastive loss, form {form}, M={M}", xname="B",
        sizes={"quick": [128, 256, 512, 1024], "cpu": [512, 1024, 2048, 4096], "cuda": [4096, 8192, 16384, 32768]},
        make_inputs=make_inputs, impls=impls, reference={"default": naive_fn}, flops=flops, mm_shape=mm_shape,
        describe=lambda tier, device: f"{what}, D={dims(tier, device)}, {str(_lowp(device)).replace('torch.', '')}, "
                                      "fwd+bwd (gradient of the embeddings)")


# ---------------------------------------------------------------- linear cross-entropy
def _lce_dims(tier, device):
    if tier == "quick":
        return 4096, 128
    return 21128, 768


def _linear_ce_op() -> Op:
    def make_inputs(N, device, tier):
        K, H = _lce_dims(tier, device)
        g = torch.Generator().manual_seed(4321)                 # as benchmarks/bench_linear_ce.py
        hidden = torch.randn(N, H, generator=g)
        weight = torch.randn(K, H, generator=g) * H ** -0.5
        target = torch.randint(0, K, (N,), generator=g)
        dt = _lowp(device)
        return {"hidden": hidden.to(device=device, dtype=dt).requires_grad_(True),
                "weight": weight.to(device=device, dtype=dt).requires_grad_(True),
                "target": target.to(device), "leaves": ["hidden", "weight"], "K": K, "H": H}

    def sf_build(be):
        import scale_fast as sf
        return lambda inp: (lambda: sf.linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], backend=be))

    def naive_fn(inp):
        return naive_linear_ce(inp["hidden"], inp["weight"], inp["target"])

    def impls(device):
        out = _sf_impls(device, sf_build)
        out.append(Impl("naive torch (F.linear + F.cross_entropy)", "naive", lambda inp: (lambda: naive_fn(inp))))
        if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
            for label, opts in (("torch F.linear_cross_entropy (chunked options)", "chunked"),
                                ("torch F.linear_cross_entropy (options=None)", None)):
                def build_t(inp, opts=opts):
                    o = torch.nn.LinearCrossEntropyOptions() if opts else None
                    return lambda: F.linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], options=o)
                out.append(Impl(label, "peer", build_t))
        else:
            out.append(Impl("torch F.linear_cross_entropy", "peer",
                            skip=f"torch {torch.__version__} has no F.linear_cross_entropy"))
        why = _cuda_only("liger_kernel", "liger-kernel", device)
        if why:
            out.append(Impl("Liger fused_linear_cross_entropy", "peer", skip=why))
        else:
            def build_l(inp):
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lflce
                return lambda: lflce(inp["hidden"], inp["weight"], inp["target"])
            out.append(Impl("Liger fused_linear_cross_entropy", "peer", build_l))
        why = _cuda_only("cut_cross_entropy", "cut-cross-entropy", device)
        if why:
            out.append(Impl("Cut Cross-Entropy", "peer", skip=why))
        else:
            def build_c(inp):
                from cut_cross_entropy import linear_cross_entropy as cce
                return lambda: cce(inp["hidden"], inp["weight"], inp["target"])
            out.append(Impl("Cut Cross-Entropy", "peer", build_c))
        return out

    return Op(
        name="linear_ce", title="fused linear cross-entropy", xname="N",
        sizes={"quick": [256, 512, 1024], "cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 8192, 16384, 32768]},
        make_inputs=make_inputs, impls=impls, reference={"default": naive_fn},
        flops=lambda inp: 6.0 * inp["hidden"].shape[0] * inp["K"] * inp["H"],
        mm_shape=lambda inp: (inp["hidden"].shape[0], inp["H"], inp["K"]),
        describe=lambda tier, device: "`sf.linear_cross_entropy(hidden, weight, target)`, K={}, H={}, {}, no bias, "
                                      "reduction mean, fwd+bwd (gradients of hidden and weight)".format(
                                          *_lce_dims(tier, device), str(_lowp(device)).replace("torch.", "")))


# ---------------------------------------------------------------- JCT attention paths
JCT_SIZES = {"quick": (64, 2, 2), "cpu": (256, 2, 4), "cuda": (768, 6, 8)}   # dim, layers, heads


def _jct_op() -> Op:
    def make_inputs(B, device, tier):
        from scale_fast.data import SyntheticProducts, collate
        from scale_fast.model import MODALITIES, JointCoTransformer, SCALEConfig
        cfg = SCALEConfig.tiny()
        data = SyntheticProducts(B, seed=4242, world_seed=0, config=cfg)      # as benchmarks/bench_jct.py
        batch = collate([data[i] for i in range(len(data))], cfg)
        dim, depth, heads = JCT_SIZES[tier]
        torch.manual_seed(0)
        jct = JointCoTransformer(dim, depth, heads, [cfg.seq_len(m) for m in MODALITIES], mlp_ratio=2.0,
                                 attention="sdpa").to(device)
        g = torch.Generator().manual_seed(0)
        inp = {"module": jct, "present": batch.present.to(device), "valid": [], "leaves": [], "dim": dim}
        for i, m in enumerate(MODALITIES):
            v = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch.valid(m)], dim=1).to(device)
            inp["valid"].append(v)
            inp[f"tok{i}"] = torch.randn(B, v.shape[1], dim, generator=g).to(device).requires_grad_(True)
            inp["leaves"].append(f"tok{i}")
        inp["proj"] = torch.randn(dim, generator=g).to(device)
        return inp

    def loss(inp, missing, module=None):
        jct = module or inp["module"]
        toks = [inp[k] for k in inp["leaves"]]
        out = jct(toks, inp["valid"], inp["present"], missing=missing)
        # outputs at the kept tokens (present modality, not padding): "drop" and "mask" give the same values
        return sum(((o @ inp["proj"].to(o.dtype)) * (v & inp["present"][m][:, None])).sum()
                   for m, (o, v) in enumerate(zip(out.tokens, inp["valid"])))

    def impls(device):
        out = [Impl("JCT drop (scale_fast, sdpa)", "scale_fast", lambda inp: (lambda: loss(inp, "drop")), ref="mask"),
               Impl("JCT mask (naive: masked attention)", "naive", lambda inp: (lambda: loss(inp, "mask")), ref="mask"),
               Impl("JCT zero (paper: zero imputation)", "naive", lambda inp: (lambda: loss(inp, "zero")), ref="zero")]
        why = _cuda_only("xformers", "xformers", device)
        for mode in ("drop", "zero"):
            name = f"JCT {mode} (xformers)"
            if why:
                out.append(Impl(name, "peer", skip=why))
            else:
                def build_x(inp, mode=mode):
                    mod = copy.deepcopy(inp["module"])
                    mod.set_attention("xformers") if hasattr(mod, "set_attention") else None
                    return lambda: loss(inp, mode, mod)
                out.append(Impl(name, "peer", build_x, ref="mask" if mode == "drop" else "zero"))
        return out

    return Op(
        name="jct", title="Joint Co-Transformer attention paths (drop vs zero)", xname="B",
        sizes={"quick": [8, 16, 32, 64], "cpu": [32, 64, 128, 256], "cuda": [64, 128, 256, 512]},
        make_inputs=make_inputs, impls=impls,
        reference={"mask": lambda inp: loss(inp, "mask"), "zero": lambda inp: loss(inp, "zero")},
        describe=lambda tier, device: "JointCoTransformer (dim, layers, heads) = {} on a batch of synthetic products "
                                      "(text 100%, image 85%, table 80%, video 30%, audio 20% present), float32, "
                                      "fwd+bwd of a projection of the kept tokens' outputs; drop/mask are checked "
                                      "against a float64 mask run, zero against a float64 zero run (it computes "
                                      "another function); no useful-FLOP model".format(JCT_SIZES[tier]))


# ---------------------------------------------------------------- one full SCALELoss step
def _scale_dims(tier, device):
    if tier == "quick":
        return 64, 2048, 256          # D, text vocab, image classes
    return (512 if device.startswith("cuda") else 256), 21128, 1601


def _scale_step_op() -> Op:
    def make_inputs(B, device, tier):
        D, Kt, Ki = _scale_dims(tier, device)
        g = torch.Generator().manual_seed(77 + B)
        emb = torch.randn(5, B, D, generator=g)
        present = torch.rand(5, B, generator=g) < torch.tensor(PRESENT_RATES)[:, None]
        present[0] |= ~present.any(0)
        Nt, Ni = 4 * B, 2 * B
        img = torch.nonzero(present[1]).flatten()
        idx_t = torch.randint(0, B, (Nt,), generator=g)
        idx_i = img[torch.randint(0, img.numel(), (Ni,), generator=g)]
        dt = _lowp(device)
        t = lambda x: x.to(device=device, dtype=dt).requires_grad_(True)  # noqa: E731
        return {"emb": t(emb), "present": present.to(device),
                "h_text": t(torch.randn(Nt, D, generator=g)), "w_text": t(torch.randn(Kt, D, generator=g) * D ** -0.5),
                "y_text": torch.randint(0, Kt, (Nt,), generator=g).to(device), "i_text": idx_t.to(device),
                "h_img": t(torch.randn(Ni, D, generator=g)), "w_img": t(torch.randn(Ki, D, generator=g) * D ** -0.5),
                "y_img": torch.randint(0, Ki, (Ni,), generator=g).to(device), "i_img": idx_i.to(device),
                "leaves": ["emb", "h_text", "w_text", "h_img", "w_img"], "D": D, "Kt": Kt, "Ki": Ki}

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
        w = naive_scores(naive_normalize(e, p), p)
        total = naive_contrastive(e, p, form="ntxent", weights=w)
        total = total + naive_linear_ce(inp["h_text"], inp["w_text"], inp["y_text"], w[inp["i_text"], 0, 0])
        return total + naive_linear_ce(inp["h_img"], inp["w_img"], inp["y_img"], w[inp["i_img"], 1, 1])

    def impls(device):
        return _sf_impls(device, sf_build) + [Impl("naive torch", "naive", lambda inp: (lambda: naive_fn(inp)))]

    def flops(inp):
        p, D = inp["present"].cpu(), inp["D"]
        c = sum(24 * int((p[i] & p[j]).sum()) ** 2 * D for i, j in itertools.combinations(range(5), 2))
        return float(c + 6 * D * (inp["h_text"].shape[0] * inp["Kt"] + inp["h_img"].shape[0] * inp["Ki"]))

    return Op(
        name="scale_loss_step", title="one full SCALELoss step", xname="B",
        sizes={"quick": [64, 128, 256], "cpu": [256, 512, 1024, 2048], "cuda": [2048, 4096, 8192, 16384]},
        make_inputs=make_inputs, impls=impls, reference={"default": naive_fn}, flops=flops,
        mm_shape=lambda inp: (inp["h_text"].shape[0], inp["D"], inp["Kt"]),
        describe=lambda tier, device: "`sf.SCALELoss()(emb, present, tasks).total`: M=5 (missing as above), "
                                      "ntxent, S' harmonized, MLM on text (4B rows, vocab {1}) and MRP classes on image "
                                      "(2B rows, {2} classes), D={0}, {3}, fwd+bwd (all 5 inputs' gradients)".format(
                                          *_scale_dims(tier, device), str(_lowp(device)).replace("torch.", "")))


def all_ops() -> Dict[str, Op]:
    ops = [_contrastive_op("ntxent", 2), _contrastive_op("clip", 2), _contrastive_op("ntxent", 5),
           _contrastive_op("clip", 5), _linear_ce_op(), _jct_op(), _scale_step_op()]
    return {op.name: op for op in ops}


# =========================================================================== measurement
def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pin_malloc():
    """glibc: a fixed mmap threshold (no dynamic growth) so freed big buffers leave the process
    and the VmHWM of one call sees them."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024)   # M_TRIM_THRESHOLD
    except Exception:  # noqa: BLE001
        pass


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def peak_extra(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Peak extra bytes of one call of fn (None where it cannot be measured)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        fn()
        return max(0, _proc_status()["VmHWM"] - before)
    except (OSError, KeyError):
        fn()
        return None


def time_ms(fn: Callable[[], Any], device: str, *, reps: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for k in range(reps):
            starts[k].record()
            fn()
            ends[k].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def mm_gflops(shape, dtype, device: str, *, reps: int) -> Optional[float]:
    """GFLOP/s of torch.mm on (m x k) @ (k x n) (output capped at 2^26 elements)."""
    if shape is None:
        return None
    m, k, n = shape
    n = min(n, max(256, 2 ** 26 // max(m, 1)))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: torch.mm(a, b, out=c), device, reps=max(3, reps), warmup=1))
    return 2.0 * m * k * n / (ms * 1e-3) / 1e9


def _cast(inp: dict, dtype) -> dict:
    out = dict(inp)
    for k in inp["leaves"]:
        out[k] = inp[k].detach().to(dtype).requires_grad_(True)
    if "module" in inp:
        out["module"] = copy.deepcopy(inp["module"]).to(dtype)
    if "proj" in inp:
        out["proj"] = inp["proj"].to(dtype)
    return out


def make_step(fn: Callable[[], torch.Tensor], inp: dict):
    leaves = [inp[k] for k in inp["leaves"]]
    mod = inp.get("module")

    def clear():
        for t in leaves:
            t.grad = None
        if mod is not None:
            mod.zero_grad(set_to_none=True)

    def step():
        clear()
        loss = fn()
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]
    step.clear = clear
    return step


def rel_err(x, ref) -> Optional[float]:
    if x is None or ref is None:
        return None
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    d = ref.norm().item()
    return (x - ref).norm().item() / d if d > 0 else (x - ref).norm().item()


def _tolerance(dtype) -> float:
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.1e}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
    return str(v)


def md_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(out) + "\n"


def run_op(op: Op, device: str, tier: str, sizes: Sequence[int], *, reps: int, warmup: int,
           impl_filter: Optional[set] = None, row_budget_s: Optional[float] = None, log=print) -> List[dict]:
    """Every implementation of op at every size: one record (dict) per (size, impl)."""
    records = []
    impls = op.impls(device)
    for x in sizes:
        inp = op.make_inputs(x, device, tier)
        dtype = inp[inp["leaves"][0]].dtype
        tol = op.tol or _tolerance(dtype)
        flops = op.flops(inp)
        refs: Dict[str, Any] = {}
        mm = None
        try:
            mm = mm_gflops(op.mm_shape(inp), dtype, device, reps=reps) if flops else None
        except Exception as exc:  # noqa: BLE001
            log(f"  torch.mm rate failed: {exc}")
        for impl in impls:
            rec = {"op": op.name, op.xname: x, "x": x, "impl": impl.name, "kind": impl.kind, "status": "ok"}
            records.append(rec)
            if impl_filter and impl.name not in impl_filter and not any(f in impl.name for f in impl_filter):
                rec.update(status="skipped", reason="not selected (--impls)")
                continue
            if impl.skip:
                rec.update(status="skipped", reason=impl.skip)
                continue
            try:
                if impl.ref not in refs:              # float64 naive reference of this size
                    inp64 = _cast(inp, torch.float64)
                    step64 = make_step(lambda: op.reference[impl.ref](inp64), inp64)
                    refs[impl.ref] = step64()
                    del inp64, step64
                step = make_step(impl.build(inp), inp)
                loss, grads = step()                  # agreement check (and first warm-up)
                ref_loss, ref_grads = refs[impl.ref]
                rec["loss"] = float(loss)
                rec["loss rel err"] = rel_err(loss, ref_loss)
                errs = [rel_err(g, r) for g, r in zip(grads, ref_grads) if g is not None and r is not None]
                rec["grad rel err"] = max(errs) if errs else None
                del loss, grads
                bad = [k for k in ("loss rel err", "grad rel err") if rec[k] is not None and not rec[k] <= tol]
                if bad:
                    rec.update(status="MISMATCH", reason=f"{', '.join(bad)} above {tol:g}: not timed")
                    log(f"  {op.name} {op.xname}={x} {impl.name}: MISMATCH")
                    continue
                step.clear()
                first = time.perf_counter()
                peak = peak_extra(step, device)       # second untimed call (the check was the first)
                first = (time.perf_counter() - first) * 1e3
                rec["peak MiB"] = None if peak is None else peak / 2 ** 20
                n = reps if row_budget_s is None else int(max(1, min(reps, row_budget_s * 1e3 // max(first, 1e-3))))
                times = time_ms(step, device, reps=n, warmup=warmup)
                rec["time ms"] = statistics.median(times)
                rec["reps"] = len(times)
                if flops:
                    rate = flops / (rec["time ms"] * 1e-3) / 1e9
                    rec["useful GFLOP/s"] = rate
                    rec["mm GFLOP/s"] = mm
                    rec["x mm"] = rate / mm if mm else None
                step.clear()
                del step
                log(f"  {op.name} {op.xname}={x} {impl.name}: {rec['time ms']:.3f} ms, "
                    f"{_fmt(rec['peak MiB'])} MiB, loss err {_fmt(rec['loss rel err'])}")
            except Exception as exc:  # noqa: BLE001
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                rec.update(status="failed", reason=msg)
                log(f"  {op.name} {op.xname}={x} {impl.name}: failed ({msg})")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        del inp, refs
        gc.collect()
    return records


# =========================================================================== report
def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info(device: str) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scale_fast as sf
    info = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "device": device, "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "scale_fast": getattr(sf, "__version__", "?"), "backends": ",".join(sf.available_backends()),
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for pkg in ("triton", "matplotlib", "open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy", "xformers"):
        info[pkg] = _pkg_version(pkg) or "not installed"
    return info


def header(info: Dict[str, Any], command: str) -> str:
    machine = info.get("gpu") or f"CPU {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}"
    peers = ", ".join(f"{k} {info[k]}" for k in ("open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy",
                                                  "xformers"))
    return (f"# scale-fast bench\n\n- date: {info['date_utc']}\n- machine: {machine} ({info['os']}); load average "
            f"at start {info['loadavg']}\n- versions: python {info['python']}, torch {info['torch']}, "
            f"triton {info['triton']}, scale_fast {info['scale_fast']} (backends: {info['backends']})\n"
            f"- peers: {peers}\n- command: `{command}`\n- method: median time of the repeats after warm-up "
            f"({'CUDA events' if info['device'].startswith('cuda') else 'perf_counter'}); peak extra memory of one "
            "fwd+bwd (gradients included); every row first checked against a float64 naive run (rel errs); "
            "`× mm` = useful FLOP/s over torch.mm's rate on the op's GEMM shape in the same run\n")


COLUMNS = ["time ms", "peak MiB", "useful GFLOP/s", "x mm", "loss rel err", "grad rel err", "status"]


def op_table(op: Op, records: List[dict], tier: str, device: str) -> str:
    rows = []
    for r in records:
        row = dict(r)
        row["status"] = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        rows.append(row)
    ran = [r for r in rows if r["status"] == "ok" or r["status"].startswith(("MISMATCH", "failed"))]
    skipped = {}
    for r in rows:
        if r not in ran:
            skipped.setdefault(r["impl"], r["status"])
    text = f"\n## {op.name}: {op.title}\n\n{op.describe(tier, device)}\n\n"
    text += md_table([op.xname, "impl"] + COLUMNS, ran)
    if skipped:
        text += "\n" + "\n".join(f"- {name}: {why}" for name, why in skipped.items()) + "\n"
    return text


def write_csv(path: Path, records: List[dict], info: Dict[str, Any]):
    keys = ["op", "x", "impl", "kind", "status", "reason", "time ms", "reps", "peak MiB", "useful GFLOP/s",
            "mm GFLOP/s", "x mm", "loss", "loss rel err", "grad rel err"]
    info_keys = [f"info_{k}" for k in info]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + info_keys)
        w.writeheader()
        for r in records:
            row = {k: r.get(k) for k in keys}
            row.update({f"info_{k}": v for k, v in info.items()})
            w.writerow(row)


def plot(op: Op, records: List[dict], path: Path, info: Dict[str, Any]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if r["status"] == "ok" and r.get("time ms")]
    if not ok:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    names = list(dict.fromkeys(r["impl"] for r in ok))
    for name in names:
        rs = sorted((r for r in ok if r["impl"] == name), key=lambda r: r["x"])
        style = "-" if rs[0]["kind"] == "scale_fast" else ("--" if rs[0]["kind"] == "naive" else ":")
        xs = [r["x"] for r in rs]
        axes[0].plot(xs, [r["time ms"] for r in rs], style, marker="o", ms=3, label=name)
        mem = [(r["x"], r["peak MiB"]) for r in rs if r.get("peak MiB") is not None]
        if mem:
            axes[1].plot([m[0] for m in mem], [max(m[1], 1e-2) for m in mem], style, marker="o", ms=3, label=name)
    for ax, yl in zip(axes, ("time per fwd+bwd (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(op.xname)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    machine = info.get("gpu") or f"{info['cpu_cores']}-core CPU, {info['torch_threads']} threads"
    fig.suptitle(f"{op.title} — {machine}, torch {info['torch']}", fontsize=9)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# =========================================================================== command
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ops", default=None,
                   help="comma-separated op names (default: all): " + ", ".join(all_ops()))
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 2 min on a 2-core CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (B or N) replacing each op's defaults")
    p.add_argument("--impls", default=None, help="comma-separated implementation names (or parts of names)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats (default 3 with --quick, else 7)")
    p.add_argument("--warmup", type=int, default=None,
                   help="more untimed calls right before the repeats (default 0 with --quick, else 1); the agreement "
                        "check and the memory call always come first, untimed")
    p.add_argument("--row-budget-s", type=float, default=None,
                   help="fewer repeats (at least 1) where reps x one call would exceed this (default 1 with --quick, "
                        "else 20)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, 'auto' (default: the cores the 1-minute load average leaves "
                        "free, at least 1; OpenMP spin-waits make multi-threaded timings on a busy CPU meaningless) "
                        "or 'torch' (torch's default)")
    p.add_argument("--out", default=None, help="folder for bench.md, bench.csv and bench_<op>.png")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--list", action="store_true", help="list the ops and their implementations, then exit")
    return p


def run(args) -> Dict[str, Any]:
    _pin_malloc()
    if args.threads == "auto":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0])))
    elif args.threads not in (None, "torch"):
        torch.set_num_threads(int(args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here")
        torch.backends.cuda.matmul.allow_tf32 = False
    ops = all_ops()
    names = [n.strip() for n in args.ops.split(",")] if args.ops else list(ops)
    unknown = [n for n in names if n not in ops]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; choose among {', '.join(ops)}")
    if args.list:
        for n in names:
            print(n + ": " + "; ".join(i.name + (f" (skipped: {i.skip})" if i.skip else "")
                                       for i in ops[n].impls(device)))
        return {}
    tier = "quick" if args.quick else ("cuda" if device.startswith("cuda") else "cpu")
    reps = args.reps or (3 if args.quick else 7)
    impl_filter = set(s.strip() for s in args.impls.split(",")) if args.impls else None
    info = machine_info(device)
    command = "scale-fast bench " + " ".join(getattr(args, "argv", []) or [])
    t0 = time.perf_counter()
    all_records: List[dict] = []
    texts = []
    for n in names:
        op = ops[n]
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else op.sizes[tier]
        print(f"[{n}] {op.xname} in {sizes}", file=sys.stderr, flush=True)
        recs = run_op(op, device, tier, sizes, reps=reps, warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1), impl_filter=impl_filter,
                      row_budget_s=args.row_budget_s or (1.0 if args.quick else 20.0),
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        all_records += recs
        print(f"[{n}] done at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        texts.append(op_table(op, recs, tier, device))
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    info["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    text = header(info, command.strip()) + f"- wall time: {info['wall_s']} s; load average at end " \
                                            f"{info['loadavg_end']}\n" + "".join(texts)
    plots: List[str] = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "bench.csv", all_records, info)
        if not args.no_plots:
            try:
                import matplotlib  # noqa: F401
                for n in names:
                    p = out / f"bench_{n}.png"
                    if plot(ops[n], [r for r in all_records if r["op"] == n], p, info):
                        plots.append(str(p))
            except ImportError:
                text += ("\nmatplotlib is not installed: no plots (pip install 'scale_fast[bench]' or "
                         "pip install matplotlib)\n")
        if plots:
            text += "\nplots: " + ", ".join(Path(p).name for p in plots) + "\n"
        (out / "bench.md").write_text(text)
    print(text)
    if args.out:
        print(f"written: {Path(args.out) / 'bench.md'}, {Path(args.out) / 'bench.csv'}"
              + (", " + ", ".join(plots) if plots else ""))
    return {"records": all_records, "info": info, "text": text, "plots": plots}


def main(argv: Optional[List[str]] = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="scale-fast bench", description=__doc__.splitlines()[0]))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
