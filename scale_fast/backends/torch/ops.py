"""The "torch" backend's ops, under the names of the contract in scale_fast/_dispatch.py."""
from .contrastive import contrastive, info_nce, info_nce_rows
from .linear_ce import linear_cross_entropy
from .scores import scores
from .siglip import siglip

__all__ = ["scores", "contrastive", "siglip", "info_nce", "info_nce_rows", "linear_cross_entropy"]
