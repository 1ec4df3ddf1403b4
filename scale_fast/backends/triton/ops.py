"""The "triton" backend's ops, under the names of the contract in scale_fast/_dispatch.py."""
from scale_fast._normalize import normalize_present

from . import contrastive as _contrastive
from . import scores as _scores
from .contrastive import info_nce
from .linear_ce import linear_cross_entropy


# The kernels take normalised rows; the backend contract hands over raw embeddings.
def scores(e, present, mode):
    return _scores.scores(normalize_present(e, present), present, mode)


def contrastive(e, present, logit_scale, row_weights, form, row_range=None):
    return _contrastive.contrastive(normalize_present(e, present), present, logit_scale, row_weights, form,
                                    row_range)


__all__ = ["scores", "contrastive", "info_nce", "linear_cross_entropy"]
