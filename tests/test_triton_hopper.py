"""The fused route's Hopper GEMMs (``kernels/triton/hopper.py``: persistent, TMA descriptors, the epilogue stored in
halves) against the fp64 reference: under the interpreter on the CPU (``FORCE_IN_INTERPRETER``), and on an sm_90
GPU where the route takes them by itself. Which launches take them (``usable``) is checked as well."""

import pytest
import torch

pytest.importorskip("triton")
from adalora_kernels.kernels import unavailable_reason

if unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")):
    pytest.skip("Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)", allow_module_level=True)

from helpers import DEVICE, keep_mask, make_inputs, max_err

import adalora_kernels as ak
from adalora_kernels.kernels.triton import hopper
from adalora_kernels.kernels.triton.config import INTERPRET, target_arch
from adalora_kernels.reference import adalora_linear_backward_ref, adalora_linear_ref

S = 0.5
if not hopper.HAS_DESCRIPTORS:
    pytest.skip("this Triton has no tl.make_tensor_descriptor", allow_module_level=True)
if not INTERPRET and target_arch() < 90:
    pytest.skip("the Hopper GEMMs run on sm_90 and later", allow_module_level=True)


@pytest.fixture
def gemms(monkeypatch):
    """Every launch of the Hopper GEMMs, recorded (and the interpreter allowed to take them)."""
    monkeypatch.setattr(hopper, "FORCE_IN_INTERPRETER", True)
    calls = []
    for name in ("forward_gemm", "dx_gemm"):
        real = getattr(hopper, name)
        monkeypatch.setattr(hopper, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


# on a GPU they take the 16-bit dtypes only; the interpreter's float32 runs them exactly
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("lead,in_f,out_f,r,bias", [((37,), 136, 264, 5, True), ((2, 9), 64, 128, 17, False)])
def test_matches_the_reference(gemms, dtype, p, lead, in_f, out_f, r, bias):
    """Partial tiles on every edge (264 = 2 x 128 + 8 columns; 37 rows), more tiles than programs (the persistent
    loop), r padded to its block, with and without bias and dropout."""
    x, w, b, P, lam, Q, m = make_inputs(lead, in_f, out_f, r, dtype, bias=bias, mask=True)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, dropout_p=p, seed=11, backend="triton")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, leaves, g)
    assert gemms == ["forward_gemm", "dx_gemm"]
    rows = x.numel() // in_f
    keep = keep_mask("triton", (rows, in_f), p, 11) if p > 0 else None
    refs = [adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, p, upcast=True),
            *adalora_linear_backward_ref(g, x, w, P, lam, Q, S, m, keep, p, upcast=True)]  # fmt: skip
    rel = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for name, out, ref in zip(["y", "dx", "dP", "dlam", "dQ"], [y, *grads], refs):
        assert max_err(out, ref) <= rel * max(ref.abs().max().item(), 1e-3), name


def test_the_same_numbers_as_the_portable_gemms(gemms, monkeypatch):
    """The same mask bits and the same epilogue: results within rounding of the portable kernels' (float32 under
    the interpreter, float16 on a GPU)."""
    dtype = torch.float32 if INTERPRET else torch.float16
    x, w, b, P, lam, Q, m = make_inputs((45,), 72, 136, 6, dtype, mask=True)
    outs = []
    for use in (True, False):
        monkeypatch.setattr(hopper, "FORCE_IN_INTERPRETER", use)
        if not INTERPRET and not use:
            monkeypatch.setattr(hopper, "usable", lambda *a: False)
        leaves = [v.detach().requires_grad_() for v in (x, P, lam, Q)]
        y = ak.adalora_linear(leaves[0], w, b, *leaves[1:], scaling=S, rank_mask=m, dropout_p=0.3, seed=5,
                              backend="triton")  # fmt: skip
        outs.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    assert gemms == ["forward_gemm", "dx_gemm"]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for tma, portable in zip(*outs):
        torch.testing.assert_close(tma, portable, rtol=tol, atol=tol)


def test_usable_only_for_tma_layouts(monkeypatch):
    monkeypatch.setattr(hopper, "FORCE_IN_INTERPRETER", True)
    a = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    assert hopper.usable(torch.float16, a, a)
    assert not hopper.usable(torch.float64, a.double())  # no float64 through TMA and the tensor cores
    assert hopper.usable(torch.float32, a.float()) == INTERPRET  # float32: the interpreter's tests only
    assert not hopper.usable(torch.float16, a.t())  # a column stride other than 1
    assert not hopper.usable(torch.float16, a[:, 1:])  # a start 2 bytes past alignment
    assert not hopper.usable(torch.float16, a[:0])  # nothing to describe
    rows_132 = torch.randn(8, 66, device=DEVICE, dtype=torch.float16)[:, :64]
    assert not hopper.usable(torch.float16, rows_132)  # a row stride of 132 bytes
    if INTERPRET:
        monkeypatch.setattr(hopper, "FORCE_IN_INTERPRETER", False)
        assert not hopper.usable(torch.float16, a)  # the interpreter takes them only when a test asks


def test_rocm_gpus_never_take_them(monkeypatch):
    """ROCm reports MI300 as capability 9.4: not Hopper, so the portable kernels run there."""
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 4))
    hopper._cuda_arch.cache_clear()
    try:
        assert hopper._cuda_arch(0) == 0
    finally:
        hopper._cuda_arch.cache_clear()
