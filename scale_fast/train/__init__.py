"""SCALE pretraining: the loop behind `scale-fast pretrain` (trainer.py) and its parts, one job per module:
run.py (configuration, data, model), schedule.py (step budget, LR), data_order.py (order, prefetching),
grad_cache.py (the cached step), checkpoint.py, rng.py, log.py, signals.py, process_group.py."""
from __future__ import annotations

import importlib

__all__ = ["Trainer", "pretrain"]


def __getattr__(name: str):  # on first use: importing scale_fast.train.schedule needs no torch
    if name in __all__:
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
