"""The "torch" backend: plain PyTorch, chunked so that no B x B or N x K matrix is stored.

It runs wherever torch runs and is the reference implementation of the
backend op contracts in ``scale_fast/_dispatch.py``.
"""
from .contrastive import contrastive, info_nce, info_nce_rows
from .linear_ce import linear_cross_entropy
from .scores import scores

__all__ = ["scores", "contrastive", "info_nce", "info_nce_rows", "linear_cross_entropy"]
