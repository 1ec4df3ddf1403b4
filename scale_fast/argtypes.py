"""Command-line value types and the usage error, shared by `scale-fast` and the benchmark scripts.

Nothing here imports torch (except `device_arg` for a device other than cpu/auto), so a command
line is parsed and checked, and --help answered, before the heavy imports.
"""
from __future__ import annotations

import argparse
import math
import os


CHECKPOINT = "checkpoint.pt"  # a run folder's checkpoint, OUT/checkpoint.pt (scale_fast/train/checkpoint.py)


class UsageError(Exception):
    """A mistake in the command line or in a file it names: one line on stderr, exit status 2."""


def int_at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse says "invalid int value" for non-numbers
    return parse


def float_at_least(low: float, strict: bool = False):
    """An argparse type: a finite float >= low (> low when strict)."""
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a share strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (both excluded), got {text}")
    return value


fraction.__name__ = "float"


def threads_arg(text: str):
    """--threads: 'auto' or an int >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a number of threads >= 1 or 'auto', got {text!r}")
    return value


def pick_threads(spec) -> int:
    """The thread count of a --threads value: the number, or for 'auto' the cores that the current
    load average leaves free (at least 1)."""
    if spec != "auto":
        return int(spec)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    # OpenMP threads that compete for busy cores spin at every barrier: on an oversubscribed
    # machine one thread is several times faster than two.
    return max(1, min(cores, int(round(cores - load))))


def device_arg(text: str) -> str:
    """--device: 'auto' or a torch device that exists on this machine."""
    if text in ("auto", "cpu"):  # answered without importing torch
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine "
                                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_folder_target(flag: str, path: str, folder: bool) -> None:
    """A path the run will write: a folder (folder=True) or a file; it, or its first existing parent, must fit."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: exists and is not a folder")
        if not folder and os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a folder, not a file")
        if not os.access(path if folder else os.path.dirname(path), os.W_OK):
            raise UsageError(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot create it, {parent} is not writable")


def check_exists(flag: str, path) -> None:
    """A path the command reads: it must exist."""
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")


def check_run_folder(flag: str, path: str) -> str:
    """A folder written by `scale-fast pretrain --out` (or its best/), or a model file in one: the folder."""
    folder = path
    if os.path.isfile(folder) and os.path.basename(folder) in (CHECKPOINT, "model.pt"):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: no such folder (give the --out folder of scale-fast pretrain)")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise UsageError(f"{flag} {folder}: no config.json in it (not a folder written by scale-fast pretrain --out)")
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.pt", CHECKPOINT)):
        raise UsageError(f"{flag} {folder}: no {CHECKPOINT} or model.pt in it")
    return folder
