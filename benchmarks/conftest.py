"""pytest-benchmark suite (``pytest benchmarks --benchmark-only``), not part of the default test run.

Cases mirror ``adalora-kernels bench|memory`` and come from the same factory (adalora_kernels.benchmarking).
"""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPE = (8192, 4096, 4096) if DEVICE.type == "cuda" else (2048, 1024, 1024)


@pytest.fixture
def device():
    return DEVICE
