"""Build script. The package is pure Python unless the optional native extension is requested.

The C++/CUDA extension in ``csrc/`` is optional: set ``ADALORA_KERNELS_BUILD_EXT=0`` to skip it and
``=1`` to force it. Without a compiler the package still installs and works (torch/Triton backends).
"""

from setuptools import setup

setup()
