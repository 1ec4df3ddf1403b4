"""Packaging: the Python package scale_fast, with the Triton kernels of kernels/ installed as scale_fast.kernels."""
from setuptools import setup

setup(
    name="scale_fast",
    version="0.1.0",
    description="Fused, exact, memory-efficient SCALE multi-modal contrastive pretraining losses",
    python_requires=">=3.9",
    packages=["scale_fast", "scale_fast.torch_backend", "scale_fast.kernels", "scale_fast.model", "scale_fast.data",
              "scale_fast.cpp_backend"],
    package_dir={"scale_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    entry_points={"console_scripts": ["scale-fast=scale_fast.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
