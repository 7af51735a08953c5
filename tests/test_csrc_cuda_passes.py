"""The csrc CUDA backend's streaming passes, run on the CPU: ``csrc/cuda/adapter_passes.cuh`` compiled with the
host compiler (``tests/cuda_passes_host.cpp``), every item of a pass in turn, as the CUDA kernels' grid-stride
loops run them. Checked against the fp64 reference and its keep-mask (DESIGN §4's Philox mask, every backend's), in
float32 and float64 at every vector width the launcher can pick. The 16-bit instantiations run in the GPU tier."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adalora_kernels.reference import dropout_keep_mask, dropout_threshold

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++") or shutil.which("c++")

if CXX is None:
    pytest.skip("no host C++ compiler", allow_module_level=True)

I64, U64, U32, INT, P = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("passes") / "passes.so"
    cmd = [CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'csrc' / 'cuda'}", str(ROOT / "tests" / "cuda_passes_host.cpp"), "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    so = ctypes.CDLL(str(out))
    so.ak_vector_width.argtypes = [INT, I64, P, I64, P, I64]
    so.ak_dropout_threshold.argtypes, so.ak_dropout_threshold.restype = [ctypes.c_double], U32
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(so, f"ak_dropout_scale_{suffix}").argtypes = [P, I64, I64, P, I64, I64, U64, U32, real, INT]
        getattr(so, f"ak_masked_expand_{suffix}").argtypes = [P, P, P, P, I64, I64, INT, U64, U32, real, INT]
    return so


SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
SEED = (1 << 40) + 12345  # both halves of the 64-bit seed in play


def widths(dtype):
    return sorted({1, 16 // dtype.itemsize, 8})  # the launcher's 1 and 16-byte widths, and a wider one


def dropout_scale(lib, x, p, seed, v):
    M, K = x.shape
    xd = torch.full((M, K), float("nan"), dtype=x.dtype)
    rc = getattr(lib, f"ak_dropout_scale_{SUFFIX[x.dtype]}")(
        x.data_ptr(), x.stride(0), x.stride(1), xd.data_ptr(), M, K, SEED if seed is None else seed,
        lib.ak_dropout_threshold(p), 1.0 / (1.0 - p), v,
    )  # fmt: skip
    assert rc == 0
    return xd


def masked_expand(lib, dt, lam, Q, p, v):
    (M, R), K = dt.shape, Q.shape[1]
    out = torch.full((M, K), float("nan"), dtype=dt.dtype)
    threshold = lib.ak_dropout_threshold(p) if p > 0 else 0
    rc = getattr(lib, f"ak_masked_expand_{SUFFIX[dt.dtype]}")(
        dt.data_ptr(), lam.data_ptr(), Q.data_ptr(), out.data_ptr(), M, K, R, SEED, threshold, 1.0 / (1.0 - p), v
    )
    assert rc == 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_scale_is_the_cpu_builds_mask_times_the_scale_at_every_width(lib, dtype):
    M, K, p = 13, 40, 0.3
    x = torch.randn(M, K, dtype=dtype)
    keep = dropout_keep_mask((M, K), p, SEED)
    want = torch.where(keep, x * torch.tensor(1.0 / (1.0 - p), dtype=dtype), torch.zeros((), dtype=dtype))
    for v in widths(dtype):
        assert torch.equal(dropout_scale(lib, x, p, None, v), want), v
    # a strided x (column stride 3) on the scalar path
    wide = torch.randn(M, 3 * K, dtype=dtype)
    want = torch.where(keep, wide[:, ::3] * torch.tensor(1.0 / (1.0 - p), dtype=dtype), torch.zeros((), dtype=dtype))
    assert torch.equal(dropout_scale(lib, wide[:, ::3], p, None, 1), want)
    # the rate: about p of the elements dropped, a different seed a different mask
    big = torch.ones(256, 256, dtype=dtype)
    a, b = dropout_scale(lib, big, 0.25, 7, 4), dropout_scale(lib, big, 0.25, 8, 4)
    assert abs((a == 0).double().mean().item() - 0.25) < 0.01 and not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_masked_expand_matches_the_fp64_reference_at_every_width(lib, dtype, p):
    M, K, R = 13, 40, 5  # 13 rows: the last group of four holds one row
    g = torch.Generator().manual_seed(3)
    dt, lam, Q = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((M, R), (R,), (R, K)))
    keep = dropout_keep_mask((M, K), p, SEED) if p > 0 else torch.ones(M, K, dtype=torch.bool)
    want = ((dt * lam) @ Q) * keep / (1.0 - p)
    tol = {torch.float32: 1e-5, torch.float64: 1e-13}[dtype]
    for v in widths(dtype):
        got = masked_expand(lib, dt.to(dtype), lam.to(dtype), Q.to(dtype), p, v)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=f"width {v}")
        assert torch.equal(got == 0, ~keep), v  # dropped exactly where the mask says, nothing else zero


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9999, 0.9999999, 0.123456789])
def test_the_cpp_threshold_is_the_references(lib, p):
    """``dropout_threshold`` in dropout_philox.h, the one every csrc path (CPU and CUDA) compares against."""
    assert lib.ak_dropout_threshold(p) == dropout_threshold(p)


def test_masked_expand_without_ranks_writes_zeros(lib):
    out = masked_expand(lib, torch.empty(6, 0), torch.empty(0), torch.empty(0, 8), 0.1, 4)
    assert torch.equal(out, torch.zeros(6, 8))


def test_vector_width_needs_alignment_a_multiple_of_k_and_of_each_row_stride(lib):
    buf = torch.empty(64, dtype=torch.float32)  # the allocator aligns to at least 64 bytes
    base, off = buf.data_ptr(), buf[1:].data_ptr()
    assert lib.ak_vector_width(4, 40, base, 40, base, 40) == 4
    assert lib.ak_vector_width(2, 40, base, 40, base, 40) == 8
    assert lib.ak_vector_width(8, 40, base, 40, base, 40) == 2
    assert lib.ak_vector_width(4, 40, off, 40, base, 40) == 1  # a pointer 4 bytes past alignment
    assert lib.ak_vector_width(4, 42, base, 42, base, 42) == 1  # K not a multiple of 4
    assert lib.ak_vector_width(4, 40, base, 41, base, 40) == 1  # a row stride that breaks alignment
    assert lib.ak_vector_width(16, 40, base, 40, base, 40) == 1  # a 16-byte element: one per load
