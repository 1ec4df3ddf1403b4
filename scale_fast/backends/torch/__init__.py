"""The "torch" backend: plain PyTorch, chunked so that no B x B or N x K matrix is stored.

It runs wherever torch runs, implements every op of the contract in
``scale_fast/_dispatch.py`` (the last resort of every fallback) and is the only
backend with the row-block (``row_range``) forms the process-group path uses.
"""
import torch

from .._capability import Capability
from .contrastive import contrastive, info_nce, info_nce_rows, siglip
from .linear_ce import linear_cross_entropy
from .scores import scores

CAPABILITY = Capability(
    name="torch",
    module=__name__,
    devices=("*",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    ops=("scores", "contrastive", "siglip", "info_nce", "info_nce_rows", "linear_cross_entropy"),
    row_range_ops=("contrastive", "siglip"),
    constant_columns_ops=("contrastive", "siglip"),
)

__all__ = ["CAPABILITY", "scores", "contrastive", "siglip", "info_nce", "info_nce_rows", "linear_cross_entropy"]
