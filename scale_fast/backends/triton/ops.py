"""The "triton" backend's ops, under the names of the contract in scale_fast/_dispatch.py."""
from scale_fast._normalize import normalize_present

from .._allpairs import PairKernels, SigLIP, all_pairs
from . import contrastive as _contrastive
from . import siglip as _siglip
from . import scores as _scores
from .contrastive import info_nce
from .linear_ce import linear_cross_entropy


# The kernels take normalised rows; the backend contract hands over raw embeddings.
def scores(e, present, mode):
    return _scores.scores(normalize_present(e, present), present, mode)


def contrastive(e, present, logit_scale, row_weights, form, row_range=None):
    return _contrastive.contrastive(normalize_present(e, present), present, logit_scale, row_weights, form,
                                    row_range)


# form="siglip": the shared all-pairs driver over the sigmoid tile kernels of siglip.py
_SIGLIP = {"siglip": SigLIP(PairKernels(None, None, None, None, siglip_forward=_siglip.siglip_forward,
                                        siglip_backward=_siglip.siglip_backward))}


def siglip(e, present, logit_scale, logit_bias, row_weights):
    return all_pairs(_SIGLIP, e, present, logit_scale, row_weights, "siglip", None, logit_bias)


__all__ = ["scores", "contrastive", "siglip", "info_nce", "linear_cross_entropy"]
