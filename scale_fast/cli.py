"""The `scale-fast` command: `scale-fast pretrain` (SCALE pretraining) and `scale-fast eval`.

    scale-fast pretrain                       # the tiny model on the synthetic world, CPU, ~2-3 minutes
    scale-fast pretrain --out runs/a          # + checkpoints and logs in runs/a
    scale-fast pretrain --out runs/a --resume # continue runs/a exactly where it stopped
    scale-fast pretrain --data DIR --config base --device cuda --precision bf16
    scale-fast eval runs/a                    # held-out retrieval of a checkpoint
    scale-fast build-ext                      # compile the C++ CPU kernels now (e.g. in an image)

Training is deterministic: the data order, the masking (a generator seeded per step),
the model and optimizer states and the RNG states (torch, numpy, python) are all in
the checkpoint, so --resume gives the same losses step for step as an uninterrupted run.  A resumed
run keeps every setting of its checkpoint (steps, evaluation cadence and size, data, batch, ...):
a flag given again with another value is honoured and logged where it only changes how the run goes
on (--steps, --eval-every, --threads, ...; scale_fast/train/checkpoint.py), else refused.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes the checkpoint and says how to
resume (exit status 130 / 143); a second one aborts at once.

A mistake in the command line or in a file it names is one line on stderr naming the flag or
file, exit status 2, found before any work; --debug (or SCALE_FAST_DEBUG=1) shows tracebacks instead.
Parsing and checking import no torch: --help, --version and mistakes answer at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from . import __version__
from .argtypes import (UsageError, check_exists, check_folder_target, check_run_folder, device_arg, float_at_least,
                       fraction, int_at_least, threads_arg)
from .backends import NAMES
from .train.schedule import DEFAULT_EPOCHS, DEFAULT_PATIENCE

BACKENDS = ("auto",) + NAMES
DEBUG_ENV = "SCALE_FAST_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (one line, no usage block)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def torch_version() -> str:
    """torch's version from its installed metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # pragma: no cover - a torch without metadata (e.g. a source build)
        import torch

        return torch.__version__


# ----------------------------------------------------------------------------------- checks
def check_pretrain_paths(args) -> None:
    """The files and folders named on the command line, before any work (as absolute paths: a
    resumed run finds them from any folder)."""
    if args.out is not None:
        check_folder_target("--out", args.out, folder=True)
    if args.log is not None:
        check_folder_target("--log", args.log, folder=False)
        args.log = os.path.abspath(args.log)
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the folder of the run to continue)")
    if args.config not in ("tiny", "base"):
        check_exists("--config", args.config)
        args.config = os.path.abspath(args.config)
    for flag, key in (("--data", "data"), ("--val-data", "val_data")):
        check_exists(flag, getattr(args, key))
        if getattr(args, key):
            setattr(args, key, os.path.abspath(getattr(args, key)))


def check_baseline_paths(args) -> None:
    check_exists("--data", args.data)
    check_exists("--val-data", args.val_data)
    if args.config not in ("tiny", "base"):
        check_exists("--config", args.config)
    if args.model is not None:
        check_run_folder("--model", args.model)


def given_settings(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The settings given on the command line, not left at their defaults (--resume keeps the others)."""
    for command in parser.commands.choices.values():
        for action in command._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0])) - {"command"}


# ----------------------------------------------------------------------------------- arguments
def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="'tiny' (default), 'base' (SCALE's sizes) or a JSON file of SCALEConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a SCALEConfig field, e.g. --set jct_layers=4 (repeatable)")
    p.add_argument("--data", default=None, help="real data: a manifest.jsonl (or its folder), see docs/data_format.md; default: the synthetic world")
    p.add_argument("--val-data", default=None, help="held-out manifest for evaluation (default with --data: a --val-fraction split of it; synthetic: 1,000 new products of the world)")
    p.add_argument("--val-fraction", type=fraction, default=0.2,
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
                   help="run the model K samples at a time (exact gradient caching, scale_fast/train/grad_cache.py): "
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
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt with every setting of that run; a flag given again with "
                        "another value is honoured and logged (--steps, --eval-every, --threads, ...) or refused")
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


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="scale-fast", description="SCALE multi-modal contrastive pretraining")
    parser.add_argument("--version", action="version", version=f"scale-fast {__version__} (torch {torch_version()})")
    sub = parser.commands = parser.add_subparsers(dest="command", required=True)
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
    e.add_argument("--val-fraction", type=fraction, default=None,
                   help="evaluate on the held-out split that `pretrain --data` made with this fraction (default: every product)")
    sub.add_parser("build-ext", parents=[debug],
                   help="compile the C++ CPU kernels (backend='cpp') now, e.g. when building a container image")
    b = sub.add_parser("baseline", parents=[debug],
                       help="a per-modality MLP + scale_loss on the same data and split, beside a model's R@1")
    b.add_argument("--data", required=True, help="the manifest (folder) that `scale-fast pretrain --data` trains on")
    b.add_argument("--val-data", default=None, help="held-out manifest (default: the --val-fraction split of --data)")
    b.add_argument("--val-fraction", type=fraction, default=0.2)
    b.add_argument("--model", default=None, help="a run folder (OUT or OUT/best) to evaluate on the same held-out products")
    b.add_argument("--config", default="tiny", help="as for pretrain: vocabulary sizes and embed_dim (default tiny)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--epochs", type=int_at_least(1), default=100)
    b.add_argument("--batch-size", type=int_at_least(2), default=128)
    b.add_argument("--lr", type=float_at_least(0.0, strict=True), default=1e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--eval-size", type=int_at_least(1), default=100_000, help="held-out products to evaluate (default: all)")
    b.add_argument("--backend", default="auto", choices=BACKENDS)
    b.add_argument("--threads", type=threads_arg, default="auto")
    # `scale-fast bench`: its arguments are parsed by scale_fast/bench/command.py (which imports torch)
    sub.add_parser("bench", add_help=False, help="time and memory of the ops against naive PyTorch and installed peers")
    return parser


def run_command(args, argv: List[str]) -> int:
    """The checked command, run: the heavy imports (torch, the model) happen here."""
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:], parser_class=Parser)
    if args.command == "eval":
        args.checkpoint = check_run_folder("eval", args.checkpoint)
        check_exists("--data", args.data)
    elif args.command == "baseline":
        check_baseline_paths(args)
    elif args.command == "pretrain":
        check_pretrain_paths(args)
        args.given = given_settings(make_parser(), argv)
    from . import commands

    if args.command == "build-ext":
        return commands.build_ext(args)
    if args.command == "baseline":
        return commands.run_baseline(args)
    if args.command == "eval":
        return commands.report(commands.run_eval(args))
    return commands.run_pretrain(args)


def main(argv: Optional[List[str]] = None) -> int:
    """The `scale-fast` command; returns the exit status (2: a usage error, 130/143: stopped by a signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        parser = make_parser()
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_command(args, argv)
    except UsageError as e:
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
