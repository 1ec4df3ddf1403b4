"""Triton kernels (installed as ``scale_fast.backends.triton``): the "triton" backend.

Each op lives in its own module with its kernels and its autograd.Function;
``scale_fast.backends.triton.ops`` exposes them under the names of the backend contract
in ``scale_fast/_dispatch.py``.  Importing needs triton; the kernels run on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported (how the test suite runs them without a GPU).
"""
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
