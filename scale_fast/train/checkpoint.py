"""The run's checkpoint, OUT/checkpoint.pt: written atomically with the whole run state (model,
optimizer, step, data position, every rank's RNG states, best evaluation, arguments), read back
by --resume."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..argtypes import CHECKPOINT, UsageError
from ..model.scale_model import atomic_torch_save, atomic_write_bytes

# --resume takes every run setting from the checkpoint; one given again with another value is
# honoured (and logged) when it changes how the run goes on, refused when it would make another run
HONOURED_ON_RESUME = ("steps", "eval_every", "save_every", "log_every", "patience", "threads", "prefetch",
                      "micro_batch", "device", "precision", "backend", "attention", "log")
NOT_RESUMED = ("resume", "out", "stop_at", "no_progress", "debug", "command", "given")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_resume(args) -> Optional[dict]:
    """--resume: the checkpoint of OUT, its run settings copied onto args; else None.

    args.given: the settings given on the command line (absent: none).  A setting given with
    another value than the checkpoint's is honoured if it is in HONOURED_ON_RESUME (the checkpoint's
    "changed" entry lists it: {key: [before, now]}), else refused with a UsageError."""
    if not args.resume:
        return None
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    if not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
    try:
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UsageError(f"--resume: cannot read {ckpt_path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    given = getattr(args, "given", set())
    changed = {}
    for key, before in resume["args"].items():
        if key in NOT_RESUMED:
            continue
        now = getattr(args, key, None)
        if key not in given:
            setattr(args, key, before)
        elif now != before and key in HONOURED_ON_RESUME:
            changed[key] = [before, now]
        elif now != before:
            shown = " ".join(now) if isinstance(now, list) else now
            raise UsageError(f"--resume: {flag(key)} {shown} differs from the run's {before!r} in {ckpt_path} "
                             f"(a resumed run keeps it: leave the flag out, or start a new run in another --out)")
    for key in ("data", "val_data"):  # the checkpoint's data must still be there
        if key not in given and getattr(args, key, None) and not os.path.exists(getattr(args, key)):
            raise UsageError(f"--resume: the run's {flag(key)} {getattr(args, key)} is no longer there")
    resume["changed"] = changed
    return resume


def save_checkpoint(out_dir: str, state: dict, config_json: str) -> None:
    """OUT/config.json and OUT/checkpoint.pt, each replaced atomically (a crash leaves the old one)."""
    atomic_write_bytes(os.path.join(out_dir, "config.json"), config_json.encode())
    atomic_torch_save(state, os.path.join(out_dir, CHECKPOINT))
