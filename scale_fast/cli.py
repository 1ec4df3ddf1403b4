"""The `scale-fast` command: `scale-fast pretrain` (SCALE pretraining) and `scale-fast eval`.

    scale-fast pretrain                       # the tiny model on the synthetic world, CPU, ~2-3 minutes
    scale-fast pretrain --out runs/a          # + checkpoints and logs in runs/a
    scale-fast pretrain --out runs/a --resume # continue runs/a exactly where it stopped
    scale-fast pretrain --data DIR --config base --device cuda --precision bf16
    scale-fast eval runs/a                    # held-out retrieval of a checkpoint
    scale-fast build-ext                      # compile the C++ CPU kernels now (e.g. in an image)

Training is deterministic: the data order, the masking (a generator seeded per step),
the model and optimizer states and the RNG states (torch, numpy, python) are all in
the checkpoint, so --resume gives the same losses step for step as an uninterrupted run.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes the checkpoint and says how to
resume (exit status 130 / 143); a second one aborts at once.

A mistake in the command line or in a file it names is one line on stderr naming the flag or
file, exit status 2; --debug (or SCALE_FAST_DEBUG=1) shows tracebacks instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import shlex
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from . import __version__
from ._dispatch import BACKENDS, resolve_backend
from .data import DataFormatError, ManifestDataset, SyntheticProducts, collate, mask_batch
from .data.manifest import manifest_feature_dims, split_indices
from .eval import encode_dataset, masked_accuracy, pair_table, retrieval
from .model import MODALITIES, SCALEConfig, SCALEModel
from .model.scale_model import MODALITY_TASK, atomic_torch_save, atomic_write_bytes
from .training import average_gradients, cached_step

HELDOUT_SEED = 999_999          # the synthetic held-out products: SyntheticProducts(eval_size, HELDOUT_SEED, world_seed)
SYNTHETIC_TRAIN_SIZE = 10_000_000
CHECKPOINT = "checkpoint.pt"
DEFAULT_STEPS = 300             # synthetic world (an endless stream): the budget in steps
DEFAULT_EPOCHS = 30             # --data: the budget follows the dataset (measured on examples/mfeat_multiview.py)
DEFAULT_PATIENCE = 8            # --data: stop after this many evaluations without a better held-out R@1
DOMINANT_STEPS = 100            # warn when the weighted masked terms exceed the contrastive term this long
BEST = "best"                   # OUT/best/: the model of the best held-out R@1 (config.json + model.pt)
LOG = "log.jsonl"
DEBUG_ENV = "SCALE_FAST_DEBUG"


class UsageError(Exception):
    """A mistake in the command line or in a file it names: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (one line, no usage block)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------------- argument types
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


def device_arg(text: str) -> str:
    """--device: 'auto' or a torch device that exists on this machine."""
    if text == "auto":
        return text
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


def check_exists(flag: str, path: Optional[str]) -> None:
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")


def check_pretrain_paths(args) -> None:
    """The files and folders named on the command line, before any work."""
    if args.out is not None:
        check_folder_target("--out", args.out, folder=True)
    if args.log is not None:
        check_folder_target("--log", args.log, folder=False)
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the folder of the run to continue)")
    if args.config not in ("tiny", "base"):
        check_exists("--config", args.config)
    check_exists("--data", args.data)
    check_exists("--val-data", args.val_data)


# ----------------------------------------------------------------------------------- arguments
def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="'tiny' (default), 'base' (SCALE's sizes) or a JSON file of SCALEConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a SCALEConfig field, e.g. --set jct_layers=4 (repeatable)")
    p.add_argument("--data", default=None, help="real data: a manifest.jsonl (or its folder), see docs/data_format.md; default: the synthetic world")
    p.add_argument("--val-data", default=None, help="held-out manifest for evaluation (default with --data: a --val-fraction split of it; synthetic: 1,000 new products of the world)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="with --data and no --val-data: the share of products held out (a fixed seeded split, the same for `scale-fast baseline`)")
    p.add_argument("--world-seed", type=int, default=0, help="the synthetic world")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and masking")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="total steps (default: synthetic 300, --data --epochs' worth; with --resume: the checkpoint's)")
    p.add_argument("--epochs", type=float_at_least(0.0, strict=True), default=None,
                   help=f"budget in passes over the training products (--data default {DEFAULT_EPOCHS}); ignored with --steps")
    p.add_argument("--patience", type=int_at_least(0), default=None,
                   help=f"early stopping: stop after this many evaluations without a better held-out R@1 (--data default {DEFAULT_PATIENCE}, synthetic 0: off)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--prefetch", type=int_at_least(0), default=3, metavar="N",
                   help="batches collated ahead in a background thread (default 3; 0: none, the least memory; "
                        "with --micro-batch the batches are held without their features, so a few ahead cost little)")
    p.add_argument("--micro-batch", type=int_at_least(1), default=None, metavar="K",
                   help="run the model K samples at a time (exact gradient caching, scale_fast/training.py): "
                        "the contrastive batch stays --batch-size; activations and input features are those of K "
                        "samples (each micro-batch's features are read from the dataset when it runs, twice a step) "
                        "(default: off; with --resume: the checkpoint's)")
    p.add_argument("--lr", type=float_at_least(0.0, strict=True), default=2e-3)
    p.add_argument("--weight-decay", type=float_at_least(0.0), default=0.01)
    p.add_argument("--warmup", type=int_at_least(0), default=20, help="linear warmup steps, then cosine decay to 10%%")
    p.add_argument("--grad-clip", type=float_at_least(0.0), default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--eval-every", type=int_at_least(0), default=None,
                   help="evaluate every N steps (0: only at the end; default synthetic 100, --data once per epoch); "
                        "OUT/best/ keeps the model of the best held-out R@1")
    p.add_argument("--eval-size", type=int_at_least(1), default=1000, help="held-out products for retrieval")
    p.add_argument("--save-every", type=int_at_least(0), default=None, help="checkpoint every N steps (default: --eval-every; needs --out)")
    p.add_argument("--log-every", type=int_at_least(1), default=10)
    p.add_argument("--out", default=None, help="folder for checkpoint.pt, config.json and log.jsonl")
    p.add_argument("--log", default=None, help="JSONL log file (default: OUT/log.jsonl when --out is given)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-at", type=int_at_least(1), default=None,
                   help="stop after this step (checkpointed), as if interrupted; --resume continues the same run")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (on CUDA)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="scale_fast loss backend")
    p.add_argument("--attention", default=None, choices=("auto", "sdpa", "xformers"))
    p.add_argument("--missing", default=None, choices=("zero", "mask", "drop"), help="absent modalities in the JCT")
    p.add_argument("--threads", type=threads_arg, default="auto",
                   help="torch CPU threads: a number, or 'auto' (the cores that the current load average leaves free, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (evaluation lines are still printed)")


def build_config(spec: str, overrides: List[str]) -> SCALEConfig:
    if spec == "tiny":
        cfg = SCALEConfig.tiny()
    elif spec == "base":
        cfg = SCALEConfig()
    else:
        try:
            with open(spec) as f:
                cfg = SCALEConfig.from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UsageError(f"--config {spec}: {e}") from None
    fields = cfg.to_dict()
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in fields:
            raise UsageError(f"--set: SCALEConfig has no field {key!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
        if isinstance(fields[key], float) and isinstance(changes[key], int):
            changes[key] = float(changes[key])
    try:
        return SCALEConfig.from_dict({**fields, **changes})
    except (ValueError, TypeError) as e:
        raise UsageError(f"--set: {e}") from None


def pick_threads(spec) -> int:
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


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# ----------------------------------------------------------------------------------- data
class DataOrder:
    """Which dataset indices step s reads: a stream of per-epoch permutations (or 0, 1, 2, ...
    without shuffling), cut into consecutive batches; position = samples already read.

    shard=(rank, world): this rank reads its contiguous share of each (global) batch."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, shard=(0, 1)):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = shard
        self._epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        epoch, k = divmod(p, self.n)
        if not self.shuffle:
            return k
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[k])

    def indices(self, position: int) -> List[int]:
        lo = position + self.rank * self.batch_size // self.world
        hi = position + (self.rank + 1) * self.batch_size // self.world
        return [self._index(p) for p in range(lo, hi)]


class Prefetcher:
    """Collates the batches of steps start, start+1, ... in a background thread (a few ahead);
    next() -> (batch, its dataset indices).  features=False: batches without their feature rows
    (the cached step reads each micro-batch's again from the dataset)."""

    def __init__(self, dataset, order: DataOrder, config: SCALEConfig, start_position: int, depth: int = 3,
                 features: bool = True):
        self.dataset, self.order, self.config, self.features = dataset, order, config, features
        self.queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self.position = start_position
        self._stop = threading.Event()
        self.thread = None
        if depth > 0:  # depth 0: collate in the caller's thread (no batch held ahead)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def collate(self, position: int):
        # samples read one at a time into the batch's buffers (no list of samples held)
        indices = self.order.indices(position)
        return collate(Subset(self.dataset, indices), self.config, features=self.features), indices

    def _run(self):
        position = self.position
        try:
            while not self._stop.is_set():
                batch = self.collate(position)
                position += self.order.batch_size  # the global batch (all ranks' shards)
                while not self._stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training thread
            self.queue.put(e)

    def next(self):
        if self.thread is None:
            batch = self.collate(self.position)
            self.position += self.order.batch_size
            return batch
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The masking generator of one step (a function of (seed, step) and, under torchrun, the rank)."""
    key = [seed, step, 77] + ([rank] if rank else [])
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def count_tokens(batch) -> int:
    return int(sum((batch.valid(m) & batch.present[i][:, None]).sum() + batch.present[i].sum()
                   for i, m in enumerate(MODALITIES)))


# ----------------------------------------------------------------------------------- state
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class JsonlLog:
    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


# ----------------------------------------------------------------------------------- evaluation
class HeldOut:
    """The held-out set, collated once: retrieval batches and one masked batch for task accuracy."""

    def __init__(self, dataset, config: SCALEConfig, size: int, seed: int, batch_size: int = 250):
        n = min(size, len(dataset))
        self.size = n
        self.batches = [collate(Subset(dataset, range(s, min(n, s + batch_size))), config)
                        for s in range(0, n, batch_size)]
        first = self.batches[0] if self.batches else None
        self.masked = None if first is None else mask_batch(first, config, step_generator(seed, 2**31 - 1))

    @torch.no_grad()
    def evaluate(self, model: SCALEModel, device, autocast) -> Dict[str, object]:
        was_training = model.training
        model.eval()
        try:
            with autocast():
                emb, present = encode_dataset(model, self.batches, device)
                result = retrieval(emb, present)
                if self.masked is not None:
                    batch, masks = self.masked
                    result.update(masked_accuracy(model, batch.to(device), {m: r.to(device) for m, r in masks.items()}))
        finally:
            model.train(was_training)
        return result


# ----------------------------------------------------------------------------------- pretrain
def init_distributed(args):
    """(rank, world): under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, else gloo.

    With CUDA, rank r uses cuda:LOCAL_RANK (`--device auto` or `cuda`); on CPU, gloo.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


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


def run_config(args, resume: Optional[dict]) -> SCALEConfig:
    """The model configuration: the checkpoint's on --resume, else --config with --set/--attention/--missing."""
    if resume is not None:
        return SCALEConfig.from_dict(resume["config"])
    config = build_config(args.config, args.set)
    if args.data and args.config in ("tiny", "base"):  # feature sizes not given: the data's own
        given = {item.split("=", 1)[0] for item in args.set}
        sizes = {f"{m}_feature_dim": d for m, d in manifest_feature_dims(args.data).items()}
        config = config.replace(**{k: d for k, d in sizes.items() if k not in given})
    if args.attention:
        config.attention = args.attention
    if args.missing:
        config.missing = args.missing
    return config


def manifest_split(data: str, val_data: Optional[str], val_fraction: float, config: SCALEConfig):
    """(train, held-out) datasets: --data and --val-data, or --data split by split_indices (seed 0:
    the same split for every run, `scale-fast baseline` and `scale-fast eval --val-fraction`)."""
    dataset = ManifestDataset(data, config)
    if val_data:
        return dataset, ManifestDataset(val_data, config)
    train, held_out = split_indices(len(dataset), val_fraction)
    return torch.utils.data.Subset(dataset, train), torch.utils.data.Subset(dataset, held_out)


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


def training_data(args, config: SCALEConfig):
    """(train set, held-out set or None, shuffle): --data/--val-data manifests, else the synthetic world."""
    if args.data:
        return (*manifest_split(args.data, args.val_data, args.val_fraction, config), True)
    train_set = SyntheticProducts(SYNTHETIC_TRAIN_SIZE, seed=args.seed, world_seed=args.world_seed, config=config)
    val_set = SyntheticProducts(args.eval_size, seed=HELDOUT_SEED, world_seed=args.world_seed, config=config)
    return train_set, val_set, False  # synthetic draws are i.i.d. already: no shuffling


def build_model(args, config: SCALEConfig, device: torch.device):
    """The seeded model on `device` and its AdamW (weight decay on matrices only)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    model = SCALEModel(config, backend=args.backend).to(device)
    model.set_backend(args.backend)
    if args.attention and args.resume:
        model.set_attention(args.attention)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    return model, opt


def make_autocast(device: torch.device, precision: str):
    """A context factory: bf16 autocast with --precision bf16, else autocast explicitly off."""
    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)
    return autocast


def format_eval(step: int, result: Dict[str, object]) -> str:
    accuracies = " ".join(f"{k} {v:.3f}" for k, v in result.items() if k.endswith("_acc"))
    return (f"step {step}: held-out R@1 {result['R@1']:.3f} R@5 {result['R@5']:.3f} "
            f"R@10 {result['R@10']:.3f} {accuracies}")


class Aborted(KeyboardInterrupt):
    """A second stop signal: training ends at once, without a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT/SIGTERM while training: the first is noted (the loop finishes its step, checkpoints
    and stops), a second raises Aborted at once.  Installed only from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        print(f"\nscale-fast: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)


class Trainer:
    """One pretraining run: its state (model, optimizer, step, data position), one training step,
    the train/eval log records, checkpoints, and the loop that ties them together.

    Under torchrun (WORLD_SIZE > 1): --batch-size is the global batch, each rank reads its
    contiguous share of it and the SCALE loss is computed over the global batch
    (scale_fast.distributed); gradients are averaged by DDP, so the update is that of one process
    on the global batch.  Rank 0 logs, evaluates and writes the checkpoint (with every rank's RNG
    state); --resume works the same way on every rank.
    """

    def __init__(self, args):
        self.args = args
        self.rank, self.world = init_distributed(args)
        self.lead = self.rank == 0
        resume = load_resume(args)
        self.config = config = run_config(args, resume)
        args.threads = pick_threads(args.threads)
        if torch.get_num_threads() != args.threads:
            torch.set_num_threads(args.threads)
        self.device = resolve_device(args.device)
        try:  # before any work, and before the progress bar: this may compile the C++ kernels (one line on stderr)
            resolve_backend(args.backend, self.device)
        except ValueError as e:
            raise UsageError(f"--backend {args.backend}: {e}") from None
        self.autocast = make_autocast(self.device, args.precision)

        self.train_set, val_set, shuffle = training_data(args, config)
        training_budget(args, len(self.train_set) if args.data else None)
        if self.world > 1 and args.batch_size < self.world:
            raise UsageError(f"--batch-size ({args.batch_size}) is the global batch: "
                             f"it must be >= the number of processes ({self.world})")
        self.order = DataOrder(len(self.train_set), args.batch_size, args.seed, shuffle, shard=(self.rank, self.world))

        self.model, self.opt = build_model(args, config, self.device)
        self.step, self.position = 0, 0
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.opt.load_state_dict(resume["optimizer"])
            self.step, self.position = resume["step"], resume["position"]
            per_rank = resume.get("rng_per_rank")
            set_rng_state(per_rank[self.rank] if per_rank and len(per_rank) == self.world else resume["rng"])
        self.train_model = self.model
        if self.world > 1:
            import torch.distributed as dist

            self.model.loss_fn.process_group = dist.group.WORLD
            if not args.micro_batch:  # the cached step averages the gradients itself, once per step
                self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)

        self.out_dir = args.out
        self.ckpt_path = os.path.join(args.out, CHECKPOINT) if args.out else None
        log_path = args.log or (os.path.join(args.out, LOG) if args.out else None)
        self.log = JsonlLog(log_path if self.lead else None)
        self.saved_args = {k: v for k, v in vars(args).items() if k != "func"}
        self.held_out = (HeldOut(val_set, config, args.eval_size, args.seed)
                         if val_set is not None and self.lead else None)
        if resume is None:
            self.log.write({"event": "start", "config": config.to_dict(), "args": self.saved_args,
                            "torch": torch.__version__, "device": str(self.device)})
        else:
            self.log.write({"event": "resume", "step": self.step})
        self.save_every = args.save_every if args.save_every is not None else args.eval_every
        self.best: Dict[str, object] = dict(resume.get("best") or {}) if resume is not None else {}
        self.since_best = resume.get("since_best", 0) if resume is not None else 0
        self.dominant_steps, self.warned = 0, False
        if self.world > 1:  # the stopping decision is rank 0's alone (it evaluates): no early stop under torchrun
            args.patience = 0
        self.result: Dict[str, object] = {}
        self.progress = None
        self.signals = StopSignals()

    # ------------------------------------------------------------------ pieces of a step
    def train_step(self, batch, indices: List[int]):
        """Mask, forward, backward and update on one collated batch (of the dataset's `indices`);
        returns (model output, loss, tokens)."""
        args, config = self.args, self.config
        # the features are masked in place (plain step) or per micro-batch (cached step): never copied whole
        batch, masks = mask_batch(batch, config, step_generator(args.seed, self.step, self.rank),
                                  features="defer" if args.micro_batch else "in_place")
        n_tokens = count_tokens(batch)
        batch = batch.to(self.device, non_blocking=True)
        masks = {m: r.to(self.device) for m, r in masks.items()}
        self.model.loss_fn.harmonize = config.harmonize and self.step >= config.harmonize_warmup_steps
        lr = lr_at(self.step, args)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        if args.micro_batch:
            lengths = {m: batch.valid(m).shape[1] for m in MODALITIES}

            def features(start: int, stop: int):  # the batch holds no feature rows: the micro-batch's, read again
                return collate(Subset(self.train_set, indices[start:stop]), config, lengths=lengths).to(self.device)
            out = cached_step(self.model, batch, masks, args.micro_batch, autocast=self.autocast, features=features)
            if self.world > 1:
                average_gradients(self.model.parameters())
        else:
            with self.autocast():
                out = self.train_model(batch, masks)
            out.loss.total.backward()
        loss = out.loss.total
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.opt.step()
        self.step += 1
        self.position += args.batch_size  # the global batch
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {self.step}")
        return out, loss_value, n_tokens

    def train_record(self, out, loss_value: float, samples: int, tokens: int, seconds: float) -> dict:
        """The `train` log record of the step just taken (throughput over the last log window)."""
        rec = {"event": "train", "step": self.step, "loss": loss_value,
               "contrastive": float(out.loss.contrastive.detach().sum() / out.loss.active.triu(1).sum().clamp(min=1)),
               "lr": lr_at(self.step - 1, self.args), "samples_per_s": samples / seconds,
               "tokens_per_s": tokens / seconds, "elapsed_s": time.perf_counter() - self.t_start}
        for i, m in enumerate(MODALITIES):
            if MODALITY_TASK[m] in self.config.tasks:
                rec[MODALITY_TASK[m]] = float(out.loss.masked[i].detach())
        self.watch_task_share(rec, out)
        return rec

    def watch_task_share(self, rec: dict, out) -> None:
        """Warn once (log and stderr) when the weighted masked terms outweigh the contrastive term for
        DOMINANT_STEPS steps in a row: their gradients then steer the encoders, not retrieval."""
        masked = float((self.model.task_weights(out.loss.masked.device) * out.loss.masked.detach()).sum())
        self.dominant_steps = self.dominant_steps + self.args.log_every if masked > rec["contrastive"] else 0
        if self.dominant_steps >= DOMINANT_STEPS and not self.warned:
            self.warned = True
            message = (f"warning: the weighted masked-task losses ({masked:.2f}) have exceeded the contrastive loss "
                       f"({rec['contrastive']:.2f}) for {self.dominant_steps} steps; consider lower task weights, "
                       f"e.g. --set mlm_weight=0.1")
            self.log.write({"event": "warning", "step": self.step, "message": message})
            if self.lead:
                print(message, file=sys.stderr)

    def evaluate(self) -> Dict[str, object]:
        """Held-out retrieval and masked-task accuracy now: logged, and printed as one line."""
        self.result = self.held_out.evaluate(self.model, self.device, self.autocast)
        self.log.write({"event": "eval", "step": self.step, **self.result})
        if self.progress is not None:
            self.progress.write(format_eval(self.step, self.result))
        else:
            print(format_eval(self.step, self.result), flush=True)
        self.keep_best()
        return self.result

    def keep_best(self) -> None:
        """After an evaluation: a better held-out R@1 is written to OUT/best/ (model.pt, config.json);
        otherwise one more evaluation counts towards --patience."""
        if not self.best or self.result["R@1"] > self.best["R@1"]:
            self.best = {**self.result, "step": self.step}
            self.since_best = 0
            if self.out_dir:
                self.model.save(os.path.join(self.out_dir, BEST))
        else:
            self.since_best += 1

    def patience_spent(self) -> bool:
        return bool(self.args.patience) and self.since_best >= self.args.patience

    def save(self) -> None:
        """Atomic checkpoint of the whole run state (every rank takes part; rank 0 writes)."""
        if not self.out_dir:
            return
        per_rank = None
        if self.world > 1:
            import torch.distributed as dist

            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, rng_state())
            if not self.lead:
                return
        atomic_write_bytes(os.path.join(self.out_dir, "config.json"), self.config.to_json().encode())
        atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                           "position": self.position, "rng": rng_state(), "config": self.config.to_dict(),
                           "args": self.saved_args, "version": 1, "world_size": self.world,
                           "rng_per_rank": per_rank, "best": self.best, "since_best": self.since_best}, self.ckpt_path)

    # ------------------------------------------------------------------ the loop
    def stop_requested(self) -> bool:
        """A stop signal arrived (on any rank: under torchrun every rank stops after the same step)."""
        signum = self.signals.signum or 0
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag)
        if signum and self.signals.signum is None:
            self.signals.signum = signum
        return bool(signum)

    def fit(self) -> Dict[str, object]:
        """Train to --steps (or --stop-at), logging, evaluating and checkpointing on schedule;
        a stop signal ends the run after the current step, checkpointed."""
        args = self.args
        if not args.no_progress and self.lead:
            from tqdm import tqdm

            self.progress = tqdm(total=args.steps, initial=self.step, desc="pretrain", unit="step",
                                 dynamic_ncols=True, file=sys.stderr)
        prefetch = (Prefetcher(self.train_set, self.order, self.config, self.position, depth=args.prefetch,
                               features=not args.micro_batch)
                    if self.step < args.steps else None)
        self.t_start = time.perf_counter()
        window_t, window_samples, window_tokens = time.perf_counter(), 0, 0
        self.model.train()
        self.signals.install()
        try:
            stop = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
            while self.step < stop:
                out, loss_value, n_tokens = self.train_step(*prefetch.next())
                window_samples += args.batch_size
                window_tokens += n_tokens
                if self.step % args.log_every == 0 or self.step == args.steps:
                    now = time.perf_counter()
                    rec = self.train_record(out, loss_value, window_samples, window_tokens, max(now - window_t, 1e-9))
                    self.log.write(rec)
                    if self.progress is not None:
                        self.progress.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rec['samples_per_s']:.0f}",
                                                  tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
                    window_t, window_samples, window_tokens = now, 0, 0
                if self.progress is not None:
                    self.progress.update(1)
                if self.stop_requested():
                    self.save()
                    break
                if self.held_out is not None and (self.step == args.steps
                                                  or (args.eval_every and self.step % args.eval_every == 0)):
                    self.evaluate()
                early = self.patience_spent()
                if self.out_dir and (early or self.step in (args.steps, stop)
                                     or (self.save_every and self.step % self.save_every == 0)):
                    self.save()
                if early:
                    self.log.write({"event": "early_stop", "step": self.step, "best_step": self.best["step"]})
                    if self.progress is not None:
                        self.progress.write(f"early stop at step {self.step}: no better held-out R@1 in "
                                            f"{args.patience} evaluations (best {self.best['R@1']:.3f} at step {self.best['step']})")
                    break
        finally:
            self.signals.restore()
            if prefetch is not None:
                prefetch.close()
            if self.progress is not None:
                self.progress.close()
        if self.signals.signum is not None:
            return self.interrupted()
        return self.finish()

    def interrupted(self) -> Dict[str, object]:
        """The `interrupted` log record; says on stderr how to resume."""
        name = signal.Signals(self.signals.signum).name
        record = {"event": "interrupted", "step": self.step, "signal": name,
                  "elapsed_s": time.perf_counter() - self.t_start}
        self.log.write(record)
        if self.lead:
            if self.out_dir:
                again = ["scale-fast", "pretrain", "--out", self.out_dir, "--resume"]
                for flag, value in (("--data", self.args.data), ("--val-data", self.args.val_data)):
                    if value:
                        again += [flag, value]
                print(f"scale-fast: {name}: stopped after step {self.step}/{self.args.steps}, checkpoint "
                      f"{self.ckpt_path}; resume with: {' '.join(map(shlex.quote, again))}", file=sys.stderr, flush=True)
            else:
                print(f"scale-fast: {name}: stopped after step {self.step}/{self.args.steps}; nothing saved "
                      "(no --out: give one to make a run resumable)", file=sys.stderr, flush=True)
        return {**record, "exit_status": 128 + self.signals.signum}

    def finish(self) -> Dict[str, object]:
        """The `done` log record, merged with the last evaluation (evaluating now if the run ended without one)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if not self.result and self.held_out is not None and self.step == self.args.steps:
            self.result = self.held_out.evaluate(self.model, self.device, self.autocast)
            self.keep_best()
        summary = {"event": "done", "step": self.step, "elapsed_s": time.perf_counter() - self.t_start,
                   "threads": self.args.threads}
        if self.world > 1:
            summary["world_size"] = self.world
        best = {k: v for k, v in self.best.items() if k != "step"} if self.best else self.result
        if self.best:  # the reported metrics are those of the kept (best) model, OUT/best/
            summary["best_step"] = self.best["step"]
            summary["last_R@1"] = self.result.get("R@1")
        summary.update({k: v for k, v in best.items() if k != "pairs"})
        self.log.write(summary)
        return {**best, **summary}


def pretrain(args) -> Dict[str, object]:
    """Run `scale-fast pretrain` with parsed arguments; returns the final evaluation (see Trainer)."""
    return Trainer(args).fit()


def run_eval(args) -> Dict[str, object]:
    folder = args.checkpoint
    if os.path.isfile(folder) and os.path.basename(folder) in (CHECKPOINT, "model.pt"):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"eval {args.checkpoint}: no such folder (give the --out folder of scale-fast pretrain)")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise UsageError(f"eval {folder}: no config.json in it (not a folder written by scale-fast pretrain --out)")
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.pt", CHECKPOINT)):
        raise UsageError(f"eval {folder}: no {CHECKPOINT} or model.pt in it")
    check_exists("--data", args.data)
    model = SCALEModel.from_checkpoint(folder)
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
    result = train_baseline([train[i] for i in range(len(train))], [held_out[i] for i in range(n)], config,
                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            backend=args.backend)
    results = {"baseline": result}
    summary = {"baseline_R@1": result["R@1"], "baseline_seconds": round(result["seconds"], 1),
               "baseline_best_epoch": result["epoch"], "train": len(train), "held_out": n}
    if args.model:
        model = SCALEModel.from_checkpoint(args.model)
        if model.config.to_dict() != {**model.config.to_dict(), **{k: getattr(config, k) for k in (
                "image_feature_dim", "video_feature_dim", "audio_feature_dim")}}:
            raise UsageError(f"--model {args.model}: trained on other feature sizes than --data has")
        evaluation = HeldOut(torch.utils.data.Subset(held_out, range(n)), model.config, n, 0)
        results = {"model": evaluation.evaluate(model, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False)),
                   **results}
        summary["model_R@1"] = results["model"]["R@1"]
    print(pair_table(results))
    print(json.dumps(summary))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="scale-fast", description="SCALE multi-modal contrastive pretraining")
    parser.add_argument("--version", action="version", version=f"scale-fast {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    p = sub.add_parser("pretrain", parents=[debug], help="pretrain a SCALE model (default: the tiny model on the synthetic world)")
    _add_pretrain_args(p)
    e = sub.add_parser("eval", parents=[debug], help="held-out retrieval and masked-task accuracy of a checkpoint folder")
    e.add_argument("checkpoint", help="a folder written by scale-fast pretrain --out")
    e.add_argument("--data", default=None, help="a manifest (default: the synthetic held-out products)")
    e.add_argument("--world-seed", type=int, default=0)
    e.add_argument("--eval-size", type=int_at_least(1), default=1000)
    e.add_argument("--device", type=device_arg, default="cpu")
    e.add_argument("--val-fraction", type=float_at_least(0.0, strict=True), default=None,
                   help="evaluate on the held-out split that `pretrain --data` made with this fraction (default: every product)")
    sub.add_parser("build-ext", parents=[debug],
                   help="compile the C++ CPU kernels (backend='cpp') now, e.g. when building a container image")
    b = sub.add_parser("baseline", parents=[debug],
                       help="a per-modality MLP + scale_loss on the same data and split, beside a model's R@1")
    b.add_argument("--data", required=True, help="the manifest (folder) that `scale-fast pretrain --data` trains on")
    b.add_argument("--val-data", default=None, help="held-out manifest (default: the --val-fraction split of --data)")
    b.add_argument("--val-fraction", type=float_at_least(0.0, strict=True), default=0.2)
    b.add_argument("--model", default=None, help="a run folder (OUT or OUT/best) to evaluate on the same held-out products")
    b.add_argument("--config", default="tiny", help="as for pretrain: vocabulary sizes and embed_dim (default tiny)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--epochs", type=int_at_least(1), default=100)
    b.add_argument("--batch-size", type=int_at_least(2), default=128)
    b.add_argument("--lr", type=float_at_least(0.0, strict=True), default=1e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--eval-size", type=int_at_least(1), default=100_000, help="held-out products to evaluate (default: all)")
    b.add_argument("--backend", default="auto", choices=BACKENDS)
    b.add_argument("--threads", default="auto")
    from .bench import add_arguments as _bench_arguments  # `scale-fast bench`: scale_fast/bench.py
    _bench_arguments(sub.add_parser("bench", help="time and memory of the ops against naive PyTorch and installed peers"))
    return parser


def run_command(args, argv: List[str]) -> int:
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if args.command == "build-ext":
        return build_ext(args)
    if args.command == "baseline":
        return run_baseline(args)
    if args.command == "eval":
        result = run_eval(args)
    else:
        check_pretrain_paths(args)
        result = pretrain(args)
        import torch.distributed as dist

        if dist.is_initialized():  # torchrun: rank 0 reports
            quiet = dist.get_rank() != 0
            dist.destroy_process_group()
            if quiet:
                return result.get("exit_status", 0)
        if "exit_status" in result:
            return result["exit_status"]
    pairs = result.pop("pairs", None)
    if pairs:
        print(pair_table({"model": {**result, "pairs": pairs}}))
    print(json.dumps(result, indent=None))  # the last line: machine-readable
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The `scale-fast` command; returns the exit status (2: a usage error, 130/143: stopped by a signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = make_parser().parse_args(argv)
        return run_command(args, argv)
    except (UsageError, DataFormatError) as e:
        if debug:
            raise
        print(f"scale-fast: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged
        if debug:
            raise
        print(f"scale-fast: error: {e} (try a lower --lr)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"scale-fast: aborted ({str(e) or 'SIGINT'})", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - not the user's mistake: one line, the traceback on request
        if debug:
            raise
        text = str(e).strip().splitlines()
        print(f"scale-fast: internal error: {type(e).__name__}: {text[0] if text else ''} "
              f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
