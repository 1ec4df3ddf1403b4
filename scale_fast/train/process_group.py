"""Joining the process group under torchrun, for the trainer."""
from __future__ import annotations

import os

import torch


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
