"""The run's checkpoint, OUT/checkpoint.pt: written atomically with the whole run state (model,
optimizer, step, data position, every rank's RNG states, best evaluation, arguments), read back
by --resume."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..argtypes import UsageError
from ..model.scale_model import atomic_torch_save, atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
RESUMED_ARGS = ("seed", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "world_seed")


def load_resume(args) -> Optional[dict]:
    """--resume: the checkpoint of OUT, its training arguments copied onto args; else None."""
    if not args.resume:
        return None
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    if not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
    try:
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UsageError(f"--resume: cannot read {ckpt_path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if args.data is None and resume["args"].get("data"):
        raise UsageError(f"--resume: the checkpoint was trained with --data {resume['args']['data']}; pass the same --data")
    for key in RESUMED_ARGS:
        setattr(args, key, resume["args"][key])
    if args.threads == "auto":
        args.threads = resume["args"]["threads"]
    if args.steps is None:
        args.steps = resume["args"]["steps"]
    if args.micro_batch is None:
        args.micro_batch = resume["args"].get("micro_batch")
    return resume


def save_checkpoint(out_dir: str, state: dict, config_json: str) -> None:
    """OUT/config.json and OUT/checkpoint.pt, each replaced atomically (a crash leaves the old one)."""
    atomic_write_bytes(os.path.join(out_dir, "config.json"), config_json.encode())
    atomic_torch_save(state, os.path.join(out_dir, CHECKPOINT))
