"""What a pretraining run is made of, from its parsed arguments: the model configuration, the
training and held-out data, the step budget, the seeded model and optimizer, the device."""
from __future__ import annotations

import json
import random
from typing import List, Optional

import numpy as np
import torch

from ..argtypes import UsageError
from ..data import ManifestDataset, SyntheticProducts
from ..data.manifest import manifest_feature_dims, split_indices
from ..model import SCALEConfig, SCALEModel

HELDOUT_SEED = 999_999          # the synthetic held-out products: SyntheticProducts(eval_size, HELDOUT_SEED, world_seed)
SYNTHETIC_TRAIN_SIZE = 10_000_000


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


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


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
