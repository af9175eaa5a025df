"""setuptools entry point (metadata lives in pyproject.toml).

The C++ CPU extension is compiled on first use by torch.utils.cpp_extension.load (ninja, cached
under ~/.cache/torch_extensions): installing needs no compiler, and pip never pulls a second
(CUDA) torch into an isolated build environment just to build it.
"""
from setuptools import setup

setup()
