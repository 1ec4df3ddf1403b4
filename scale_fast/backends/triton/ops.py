"""The "triton" backend's ops, under the names of the contract in scale_fast/_dispatch.py."""
from scale_fast._normalize import keep_present, normalize_present

from . import contrastive as _contrastive
from . import scores as _scores
from .contrastive import info_nce
from .linear_ce import linear_cross_entropy
from .siglip import siglip


# The kernels take normalised rows; the backend contract hands over raw embeddings (normalize=False:
# used as given, absent rows 0).
def _rows(e, present, normalize):
    return normalize_present(e, present) if normalize else keep_present(e, present)


def scores(e, present, mode, *, normalize=True):
    return _scores.scores(_rows(e, present, normalize), present, mode)


def contrastive(e, present, logit_scale, row_weights, form, row_range=None, *, normalize=True):
    return _contrastive.contrastive(_rows(e, present, normalize), present, logit_scale, row_weights, form,
                                    row_range)


__all__ = ["scores", "contrastive", "siglip", "info_nce", "linear_cross_entropy"]
