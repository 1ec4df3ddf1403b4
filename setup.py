"""Packaging: the scale_fast package; the cpp backend's C++ sources ship as package data (built on first use)."""
from setuptools import find_packages, setup

setup(
    name="scale_fast",
    version="0.1.0",
    description="Fused, exact, memory-efficient SCALE multi-modal contrastive pretraining losses",
    python_requires=">=3.9",
    packages=find_packages(include=["scale_fast", "scale_fast.*"]),
    package_data={"scale_fast.backends.cpp": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    entry_points={"console_scripts": ["scale-fast=scale_fast.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
