"""The traffic ledger names exactly the launches that happen: each Triton route runs under the interpreter with its
launches recorded (the Triton kernels, cuBLAS's GEMMs and the partial sums), against the ledger's rows for the same
shape and SM count; and the ledger's arithmetic on a hand-counted case."""

from collections import Counter

import pytest
import torch
from helpers import DEVICE, make_inputs, runnable_backends
from torch.utils._python_dispatch import TorchDispatchMode

from adalora_kernels.benchmarking.ledger import DEFAULT_CEILINGS, Shape, launches, ledger_rows

TRITON_ROUTES = [b for b in ("triton", "triton_split") if b in runnable_backends()]


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# (route, variant): the fused route with its portable GEMMs and with hopper.py's; the split route with atomics
# (torch's default) and with its fixed-order partials (deterministic algorithms on)
ROUTE_VARIANTS = [(r, "") for r in TRITON_ROUTES] + [("triton", "hopper")] * ("triton" in TRITON_ROUTES)
ROUTE_VARIANTS += [("triton_split", "deterministic")] * ("triton_split" in TRITON_ROUTES)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the test, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("route,variant", ROUTE_VARIANTS)
@pytest.mark.parametrize("shape", [(40, 32, 24, 4), (70, 512, 48, 4), (300, 96, 160, 8)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_the_ledger_names_the_launches_that_happen(request, monkeypatch, route, variant, shape, p):
    """The fused route twice under the interpreter: with its portable GEMMs, and with hopper.py's (as on sm_90,
    which the ledger's default ceilings are; on a GPU the installed arch decides which run). The split route
    twice: with atomics and, under deterministic algorithms, with partial buffers."""
    from adalora_kernels.kernels import get_backend
    from adalora_kernels.kernels.triton import adalora_linear as fused
    from adalora_kernels.kernels.triton import hopper as hopper_gemms

    if variant == "hopper":
        monkeypatch.setattr(hopper_gemms, "FORCE_IN_INTERPRETER", True)
    if variant == "deterministic":
        request.getfixturevalue("deterministic_algorithms")

    M, K, N, r = shape
    launched = []
    real = fused._Launch.__call__
    monkeypatch.setattr(
        fused._Launch, "__call__", lambda self, *a, **k: launched.append(self.name) or real(self, *a, **k)
    )
    kernels = get_backend(route, DEVICE)
    x, w, b, P, lam, Q, _ = make_inputs((M,), K, N, r, torch.float32, device=DEVICE)
    g = torch.randn(M, N, device=DEVICE)
    with _Ops() as ops:
        _, t = kernels.linear_forward(x, w, b, P, lam, Q, p, 3)
        kernels.linear_backward(g, x, w, P, lam, Q, t, p, 3, True, True)
    sms = fused._sm_count(DEVICE)
    arch = 90 if hopper_gemms.usable(torch.float32, x, w, g) else 80
    book = launches(route, Shape(M, K, N, r, "float32", p, variant == "deterministic"), {"sms": sms, "arch": arch})
    expected = Counter(row.kernel.split(" (")[0] for row in book if row.engine == "triton")
    assert Counter(launched) == expected
    cublas = sum(row.engine == "cublas" for row in book)
    assert ops.ops["addmm_"] == cublas  # the split route's two GEMMs, in place; none in the fused route
    assert ops.ops["sum"] == sum("sum" in row.kernel for row in book)  # partials summed: as many as counted
    assert ops.ops["zeros"] + ops.ops["zero_"] == sum(row.kernel.startswith("zeros") for row in book)


def test_the_ledger_counts_a_case_by_hand():
    s = Shape(8192, 4096, 4096, 16, "bfloat16", 0.0)
    linear = launches("linear", s)
    assert [x.flops for x in linear] == [2 * 8192 * 4096 * 4096] * 2
    assert linear[0].bytes_read == 2 * (8192 * 4096 + 4096 * 4096) and linear[0].bytes_written == 2 * 8192 * 4096
    gemm_us = 2 * 8192 * 4096 * 4096 / (DEFAULT_CEILINGS["gemm_tflops"]["bfloat16"] * 1e12) * 1e6
    assert linear[0].predicted_us == pytest.approx(gemm_us + DEFAULT_CEILINGS["launch_us"])
    split = launches("triton_split", s)
    x_pass = next(x for x in split if x.kernel == "_split_x_bwd_kernel")
    assert x_pass.bytes_read >= 2 * 8192 * 4096 and x_pass.bytes_written >= 2 * 8192 * 4096  # x read, dx₀ written
    totals = {row["variant"]: row for row in ledger_rows(s) if row["op"] == "ledger_total"}
    assert totals["linear"]["predicted_slowdown_vs_linear"] == 1.0
    # the split route: the frozen layer's GEMMs plus passes at copy bandwidth, about 1.14x; PEFT's unfused ops more
    assert 1.05 < totals["triton_split"]["predicted_slowdown_vs_linear"] < 1.2
    assert totals["peft"]["predicted_ms"] > totals["triton_split"]["predicted_ms"]
    with pytest.raises(ValueError, match="route: expected one of"):
        launches("nope", s)
