"""The "cpp" backend's ops, under the names of the contract in scale_fast/_dispatch.py."""
from .contrastive import contrastive, info_nce
from .linear_ce import linear_cross_entropy
from .scores import scores
from .siglip import siglip

__all__ = ["scores", "contrastive", "siglip", "info_nce", "linear_cross_entropy"]
