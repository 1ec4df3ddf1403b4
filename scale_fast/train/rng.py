"""The random number generators' states: saved and restored in one place (checkpoints, the cached step)."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(*, host: bool = True) -> dict:
    """torch's CPU and CUDA generators; with host=True numpy's and python's too."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if host:
        state.update(numpy=np.random.get_state(), python=random.getstate())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
