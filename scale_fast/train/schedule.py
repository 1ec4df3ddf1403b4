"""The run's schedule: its budget of steps, evaluations and patience, and the learning rate
(linear warmup, then cosine decay to 10% of --lr).  No torch: the CLI reads the defaults for its help."""
from __future__ import annotations

import math
from typing import Optional

from ..argtypes import UsageError

DEFAULT_STEPS = 300             # synthetic world (an endless stream): the budget in steps
DEFAULT_EPOCHS = 30             # --data: the budget follows the dataset (measured on examples/mfeat_multiview.py)
DEFAULT_PATIENCE = 8            # --data: stop after this many evaluations without a better held-out R@1


def lr_at(step: int, args) -> float:
    """The learning rate of `step` (0-based) for args.lr, args.warmup and args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def training_budget(args, n_train: Optional[int]) -> None:
    """Fill in --steps, --eval-every and --patience: on a dataset of n_train products (None: the
    synthetic stream) the budget is --epochs passes, evaluations once per epoch, early stopping on."""
    per_epoch = None if n_train is None else max(1, math.ceil(n_train / args.batch_size))
    if per_epoch is None and args.epochs is not None:
        raise UsageError("--epochs needs --data (the synthetic world is an endless stream: use --steps)")
    if args.steps is None:
        args.steps = DEFAULT_STEPS if per_epoch is None else max(1, math.ceil(
            (args.epochs if args.epochs is not None else DEFAULT_EPOCHS) * per_epoch))
    if args.eval_every is None:
        args.eval_every = 100 if per_epoch is None else max(10, per_epoch)
    if args.patience is None:
        args.patience = 0 if per_epoch is None else DEFAULT_PATIENCE
