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


_FAILURES = os.environ.get("ADALORA_KERNELS_FAILURES")  # a file each failure is appended to as it happens


def pytest_runtest_logreport(report):
    """With ADALORA_KERNELS_FAILURES set, write each failure (id and traceback) at once: a run cut short by a
    time limit (benchmarks/gpu_check.sh on a lent GPU) still tells what failed and why."""
    if _FAILURES and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # under xdist: the controller
        with open(_FAILURES, "a") as f:
            f.write(f"---- {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
