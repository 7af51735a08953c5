"""One masking update_and_allocate over a LLaMA-7B-like adapter set (32 blocks × 7 projections, r=12):
PEFT's against ours (hidden sizes scaled down on the CPU)."""

import pytest
import torch
from conftest import DEVICE

from adalora_kernels import benchmarking as bm
from adalora_kernels.kernels import backend_names

HIDDEN = 4096 if DEVICE.type == "cuda" else 512


@pytest.fixture(scope="module")
def pair():
    backends = bm.measurable_backends(DEVICE)
    return bm.allocator_pair(32, HIDDEN, int(HIDDEN * 2.6875), 12, torch.float32, DEVICE, backends)


@pytest.mark.parametrize("variant", ["peft", *backend_names()])
def test_allocator_step(benchmark, pair, variant):
    pm, allocators = pair
    if variant == "peft":
        fn = lambda: pm.base_model.update_and_allocate(1)  # noqa: E731
    elif variant in allocators:
        fn = lambda: allocators[variant].update_and_allocate(1)  # noqa: E731
    else:
        pytest.skip(f"{variant} unavailable on {DEVICE}")
    benchmark.extra_info.update({"op": "allocator_step", "variant": variant, "layers": 224, "hidden": HIDDEN})
    benchmark.pedantic(fn, rounds=20, warmup_rounds=1)
