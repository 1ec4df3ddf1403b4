"""The pretraining loop: `Trainer(args).fit()` runs one `scale-fast pretrain` (see scale_fast/cli.py
for its arguments), from its parts in this package: run setup (run.py), data order and prefetching
(data_order.py), the LR schedule (schedule.py), the cached step (grad_cache.py), checkpoints
(checkpoint.py), RNG states (rng.py), the log (log.py), stop signals (signals.py) and held-out
evaluation (scale_fast/held_out.py)."""
from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import time
from typing import Dict, List

import torch
from torch.utils.data import Subset

from .._dispatch import resolve_backend
from ..argtypes import UsageError, pick_threads
from ..data import collate, mask_batch
from ..data.batch import step_generator
from ..held_out import HeldOut, format_eval
from ..model import MODALITIES
from ..model.scale_model import MODALITY_TASK
from .checkpoint import CHECKPOINT, flag, load_resume, save_checkpoint
from .data_order import DataOrder, Prefetcher
from .grad_cache import average_gradients, cached_step
from .log import JsonlLog
from .process_group import init_distributed
from .rng import rng_state, set_rng_state
from .run import build_model, make_autocast, resolve_device, run_config, training_data
from .schedule import lr_at, training_budget
from .signals import StopSignals

DOMINANT_STEPS = 100            # warn when the weighted masked terms exceed the contrastive term this long
BEST = "best"                   # OUT/best/: the model of the best held-out R@1 (config.json + model.pt)
LOG = "log.jsonl"


def lower_weight(weight: float, ratio: float) -> float:
    """weight * ratio (ratio < 1: what brings the weighted terms down to the contrastive one), rounded
    down to one significant digit: always below `weight`."""
    target = weight * ratio
    if target <= 0:
        return 0.0
    unit = 10.0 ** math.floor(math.log10(target))
    return math.floor(target / unit) * unit


def count_tokens(batch) -> int:
    return int(sum((batch.valid(m) & batch.present[i][:, None]).sum() + batch.present[i].sum()
                   for i, m in enumerate(MODALITIES)))


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
        resume = load_resume(args)  # first: the checkpoint's --device decides the process group's backend
        self.rank, self.world = init_distributed(args)
        self.lead = self.rank == 0
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
        if self.lead and not args.out:  # said at the start, not only when the run is interrupted
            print("scale-fast pretrain: no --out: nothing will be saved (no checkpoint, log or resume)",
                  file=sys.stderr, flush=True)
        self.ckpt_path = os.path.join(args.out, CHECKPOINT) if args.out else None
        log_path = args.log or (os.path.join(args.out, LOG) if args.out else None)
        self.log = JsonlLog(log_path if self.lead else None)
        self.saved_args = {k: v for k, v in vars(args).items() if k not in ("func", "given")}
        self.held_out = (HeldOut(val_set, config, args.eval_size, args.seed)
                         if val_set is not None and self.lead else None)
        if resume is None:
            self.log.write({"event": "start", "config": config.to_dict(), "args": self.saved_args,
                            "torch": torch.__version__, "device": str(self.device)})
        else:
            changed = resume["changed"]
            self.log.write({"event": "resume", "step": self.step, **({"changed": changed} if changed else {})})
            if changed and self.lead:
                print("scale-fast: --resume: " + ", ".join(f"{flag(k)} {now} (the run had {before})"
                                                           for k, (before, now) in changed.items()),
                      file=sys.stderr, flush=True)
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
        weighted = self.model.task_weights(out.loss.masked.device) * out.loss.masked.detach()
        masked = float(weighted.sum())
        self.dominant_steps = self.dominant_steps + self.args.log_every if masked > rec["contrastive"] else 0
        if self.dominant_steps >= DOMINANT_STEPS and not self.warned:
            self.warned = True
            task = MODALITY_TASK[MODALITIES[int(weighted.argmax())]]  # the largest weighted term's
            weight = self.config.task_weight(task)
            message = (f"warning: the weighted masked-task losses ({masked:.2f}) have exceeded the contrastive loss "
                       f"({rec['contrastive']:.2f}) for {self.dominant_steps} steps; consider lower task weights, "
                       f"e.g. --set {task}_weight={lower_weight(weight, rec['contrastive'] / masked):g} "
                       f"(now {weight:g})")
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
        save_checkpoint(self.out_dir, {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                                       "step": self.step, "position": self.position, "rng": rng_state(),
                                       "config": self.config.to_dict(), "args": self.saved_args, "version": 1,
                                       "world_size": self.world, "rng_per_rank": per_rank, "best": self.best,
                                       "since_best": self.since_best}, self.config.to_json())

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
                if self.held_out is not None and (self.step == args.steps
                                                  or (args.eval_every and self.step % args.eval_every == 0)):
                    self.evaluate()  # before a stop: the resumed run starts after this step
                early = self.patience_spent()
                if not early and self.stop_requested():
                    self.save()
                    break
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
                again = ["scale-fast", "pretrain", "--out", self.out_dir, "--resume"]  # the checkpoint holds the rest
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
