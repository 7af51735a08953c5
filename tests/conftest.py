import os

# Triton kernels run through the interpreter on machines without a GPU; this must be set before any
# kernel module is imported, and a single autotune config keeps interpreter runs short.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ADALORA_KERNELS_AUTOTUNE", "0")

import pytest


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
