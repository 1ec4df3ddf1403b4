"""The backends: ``torch`` (plain PyTorch, runs anywhere), ``triton`` (fused GPU kernels) and ``cpp``
(compiled CPU kernels).  Each implements (some of) the op contracts listed in ``scale_fast/_dispatch.py``
and declares what it covers in a ``CAPABILITY`` record (``_capability.py``) in its ``__init__``.

``NAMES`` is the registry: one package here per name, in the order "auto" considers them.
"""
NAMES = ("torch", "triton", "cpp")
