"""One training step of a tiny Hugging Face Llama, original vs scale_fast-patched: peak resident memory and time, CPU.

``LlamaForCausalLM`` made from a config (hidden 256, 2 layers, float32, untied lm_head), B x T tokens
with labels (the first 16 positions of each row -100), AdamW; one step = forward with labels,
backward, ``optimizer.step()``, ``zero_grad()``. "original" is transformers' forward (the [B*T, vocab]
logits, ForCausalLMLoss); "patched torch" / "patched cpp" is the same model after
``scale_fast.integrations.transformers.apply(model, backend=...)`` (linear_cross_entropy on the hidden
states and lm_head.weight). Each memory figure comes from a fresh process after a warm-up step at
T=16 (which also creates AdamW's state): peak RSS growth = VmHWM minus VmRSS just before the step
(as benchmarks/bench_memory_cpu.py measures it). ``--timing``: original and patched steps interleaved
in one process, median of ``--reps`` (time ratios; absolute CPU times only as context).

    python benchmarks/bench_hf_causal_lm.py                                  # vocab 32000 151936
    python benchmarks/bench_hf_causal_lm.py --vocabs 151936 --tokens 2 512 --timing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _script import RESULTS
from scale_fast.bench import measure, report

HIDDEN, LAYERS = 256, 2
IMPLS = {"original": None, "patched torch": "torch", "patched cpp": "cpp"}


def _model(vocab: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _batch(vocab: int, B: int, T: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100
    return ids, labels


def _step(model, optimizer, ids, labels):
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _patch(model, impl: str):
    from scale_fast.integrations import transformers as sft

    if "_scale_fast" in model.__dict__:
        sft.revert(model)
    if IMPLS[impl] is not None:
        sft.apply(model, backend=IMPLS[impl])


def child(impl: str, vocab: int, B: int, T: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, optimizer = _model(vocab)
    _patch(model, impl)
    _step(model, optimizer, *_batch(vocab, B, 16))        # warm-up: code pages, AdamW state, cpp build
    ids, labels = _batch(vocab, B, T)
    out = {}
    t0 = time.perf_counter()
    peak = measure.peak_extra(lambda: out.setdefault("loss", _step(model, optimizer, ids, labels)), "cpu")
    grads = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    print(json.dumps({"ms": (time.perf_counter() - t0) * 1e3, "mib": None if peak is None else peak / 2 ** 20,
                      "grad_mib": grads, "loss": out["loss"]}), flush=True)


def timing_child(vocab: int, B: int, T: int, reps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, optimizer = _model(vocab)
    ids, labels = _batch(vocab, B, T)
    times = {impl: [] for impl in IMPLS}
    for rep in range(reps + 1):                             # rep 0: warm-up
        for impl in IMPLS:                                  # interleaved, so load drifts hit all alike
            _patch(model, impl)
            t0 = time.perf_counter()
            _step(model, optimizer, ids, labels)
            if rep:
                times[impl].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"vocab": vocab, "times": times}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--tokens", type=int, nargs=2, default=[2, 1024], metavar=("B", "T"))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing", action="store_true", help="also time the three interleaved in one process")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=None, help="where the .md goes (default benchmarks/results)")
    args = p.parse_args()
    B, T = args.tokens

    info = report.machine_info("cpu")
    t_start = time.time()
    rows, timings = [], []
    for vocab in args.vocabs:
        base = None
        for impl in args.impls:
            load = os.getloadavg()[0]
            rec = measure.fresh_process([os.path.abspath(__file__), "--child", impl, vocab, B, T, args.threads])
            row = {"vocab": vocab, "impl": impl, "peak RSS growth MiB": rec.get("mib"),
                   "of which parameter gradients MiB": rec.get("grad_mib"), "step ms": rec.get("ms"),
                   "loss": rec.get("loss"), "load": load}
            if impl == "original":
                base = rec.get("mib")
            if base and rec.get("mib") is not None:
                row["memory / original"] = rec["mib"] / base
            if "error" in rec:
                row["error"] = rec["error"]
            rows.append(row)
            print(row, flush=True)
        if args.timing:
            timings.append(measure.fresh_process([os.path.abspath(__file__), "--timing-child", vocab, B, T, args.reps, args.threads]))
            print(timings[-1], flush=True)
    info["loadavg_end"] = report.loadavg()
    info["wall_s"] = round(time.time() - t_start)

    text = report.header(
        "Hugging Face LlamaForCausalLM, one training step: original vs scale_fast-patched, CPU", info,
        "python benchmarks/bench_hf_causal_lm.py " + " ".join(sys.argv[1:]),
        "each row a fresh process: a warm-up step at T=16 (AdamW state created), then one measured step "
        "(forward with labels, backward, AdamW step, zero_grad); peak RSS growth = VmHWM minus VmRSS just before "
        "the step, allocator untuned (what users see); it includes the parameter gradients (listed); "
        "step ms = that one step (one sample)")
    text += (f"\nLlama from a config: hidden {HIDDEN}, {LAYERS} layers, untied lm_head, float32; "
             f"B x T = {B} x {T} tokens; {report.plural(args.threads, 'thread')}.\n\n")
    cols = ["vocab", "impl", "peak RSS growth MiB", "memory / original", "of which parameter gradients MiB",
            "step ms", "loss", "load"]
    text += report.md_table(cols, rows)
    errors = [f"- {r['impl']} vocab={r['vocab']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        text += "\nErrors:\n\n" + "\n".join(errors) + "\n"
    for timing in timings:
        if "times" not in timing:
            text += f"\nTiming failed: {timing.get('error')}\n"
            continue
        med = {k: statistics.median(v) for k, v in timing["times"].items()}
        text += (f"\n## Time, vocab {timing['vocab']}, the implementations interleaved in one process, "
                 f"median of {args.reps}\n\n")
        text += report.md_table(["impl", "step ms", "time / original", "samples ms"], [
            {"impl": k, "step ms": v, "time / original": v / med["original"],
             "samples ms": ", ".join(f"{x:.0f}" for x in timing["times"][k])} for k, v in med.items()])
    print(text)
    out = args.out_dir or RESULTS
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "hf_causal_lm_cpu.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) == 7 and sys.argv[1] == "--timing-child":
        timing_child(*map(int, sys.argv[2:7]))
    else:
        sys.exit(main())
