"""What each `scale-fast` command does once scale_fast/cli.py has parsed and checked its arguments
(imported only then: the heavy imports wait until a command runs)."""
from __future__ import annotations

import json
from typing import Dict

import torch

from .argtypes import UsageError, pick_threads
from .data import ManifestDataset, SyntheticProducts
from .eval import pair_table
from .held_out import HeldOut
from .model import SCALEModel
from .train import pretrain
from .train.run import HELDOUT_SEED, manifest_split, resolve_device, run_config


def run_pretrain(args) -> int:
    """`scale-fast pretrain`: the run, then its report (rank 0 under torchrun); the exit status."""
    result = pretrain(args)
    import torch.distributed as dist

    if dist.is_initialized():  # torchrun: rank 0 reports
        quiet = dist.get_rank() != 0
        dist.destroy_process_group()
        if quiet:
            return result.get("exit_status", 0)
    if "exit_status" in result:
        return result["exit_status"]
    return report(result)


def report(result: Dict[str, object]) -> int:
    """Print an evaluation: the per-pair table, then the summary as the last, machine-readable line."""
    pairs = result.pop("pairs", None)
    if pairs:
        print(pair_table({"model": {**result, "pairs": pairs}}))
    print(json.dumps(result, indent=None))
    return 0


def run_eval(args) -> Dict[str, object]:
    """`scale-fast eval`: held-out retrieval and task accuracy of the run folder args.checkpoint."""
    model = SCALEModel.from_checkpoint(args.checkpoint)
    config = model.config
    device = resolve_device(args.device)
    model.to(device)
    if args.data:
        dataset = ManifestDataset(args.data, config)
        if args.val_fraction is not None:
            dataset = manifest_split(args.data, None, args.val_fraction, config)[1]
    else:
        dataset = SyntheticProducts(args.eval_size, seed=HELDOUT_SEED, world_seed=args.world_seed, config=config)
    held_out = HeldOut(dataset, config, args.eval_size, 0)
    return held_out.evaluate(model, device, lambda: torch.autocast(device_type=device.type, enabled=False))


def build_ext(args) -> int:
    """`scale-fast build-ext`: compile the C++ CPU kernels now; prints the library's path."""
    from .backends.cpp.__main__ import main as build_main

    return build_main(["--build"])


def run_baseline(args) -> int:
    """`scale-fast baseline`: train the MLP baseline, print its R@1 per pair (beside --model's)."""
    from .baseline import train_baseline

    torch.set_num_threads(pick_threads(args.threads))
    args.attention = args.missing = None
    config = run_config(args, None)
    train, held_out = manifest_split(args.data, args.val_data, args.val_fraction, config)
    n = min(len(held_out), args.eval_size)
    model = None
    if args.model:  # before training: a model of other feature sizes is a mistake found at once
        model = SCALEModel.from_checkpoint(args.model)
        if model.config.to_dict() != {**model.config.to_dict(), **{k: getattr(config, k) for k in (
                "image_feature_dim", "video_feature_dim", "audio_feature_dim")}}:
            raise UsageError(f"--model {args.model}: trained on other feature sizes than --data has")
    result = train_baseline([train[i] for i in range(len(train))], [held_out[i] for i in range(n)], config,
                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            backend=args.backend)
    results = {"baseline": result}
    summary = {"baseline_R@1": result["R@1"], "baseline_seconds": round(result["seconds"], 1),
               "baseline_best_epoch": result["epoch"], "train": len(train), "held_out": n}
    if model is not None:
        evaluation = HeldOut(torch.utils.data.Subset(held_out, range(n)), model.config, n, 0)
        results = {"model": evaluation.evaluate(model, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False)),
                   **results}
        summary["model_R@1"] = results["model"]["R@1"]
    print(pair_table(results))
    print(json.dumps(summary))
    return 0
