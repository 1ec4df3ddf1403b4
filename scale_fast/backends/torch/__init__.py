"""The "torch" backend: plain PyTorch, chunked so that no B x B or N x K matrix is stored.

It runs wherever torch runs, implements every op of the contract in
``scale_fast/_dispatch.py`` (the last resort of every fallback) and is the only
backend with the row-block (``row_range``) forms the process-group path uses.
"""
import torch

from .._capability import Capability
from . import ops  # imported with the package: the fallback of every lookup, never imported while tracing

CAPABILITY = Capability(
    name="torch",
    module=ops.__name__,
    devices=("*",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    ops=("scores", "contrastive", "siglip", "info_nce", "info_nce_rows", "linear_cross_entropy"),
    row_range_ops=("contrastive", "siglip"),
    constant_columns_ops=("contrastive", "siglip"),
)

__all__ = ["CAPABILITY"]
