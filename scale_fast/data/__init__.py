"""Data for SCALE pretraining: the synthetic world, the on-disk format, batching and masking."""
from .batch import Batch, MaskedRows, collate, mask_batch, mask_features
from .manifest import DataFormatError, ManifestDataset
from .synthetic import SyntheticProducts

__all__ = ["Batch", "MaskedRows", "collate", "mask_batch", "mask_features", "SyntheticProducts",
           "ManifestDataset", "DataFormatError"]
