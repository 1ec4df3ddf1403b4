"""The backends: ``torch`` (plain PyTorch, runs anywhere), ``triton`` (fused GPU kernels) and ``cpp``
(compiled CPU kernels).  Each implements the op contracts listed in ``scale_fast/_dispatch.py``."""
