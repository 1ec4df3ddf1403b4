"""Packaging: the scale_fast package; the cpp backend's C++ sources ship as package data (built on first use)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "scale_fast" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="scale_fast",
    version=VERSION,
    description="Fused, exact, memory-efficient SCALE multi-modal contrastive pretraining losses",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="The scale_fast authors",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["contrastive learning", "multi-modal", "pretraining", "loss", "triton", "pytorch", "SCALE", "M5Product"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.9",
    packages=find_packages(include=["scale_fast", "scale_fast.*"]),
    package_data={"scale_fast.backends.cpp": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    entry_points={"console_scripts": ["scale-fast=scale_fast.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "transformers>=5.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
