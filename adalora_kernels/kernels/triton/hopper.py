"""The fused route's two GEMMs for Hopper (sm_90 and later; DESIGN §4 route a), and their launchers.

The portable kernels of ``adalora_linear.py`` load every tile through pointer arithmetic with masks, one program
per output tile. Here the same two GEMMs run the way Hopper's fastest GEMMs do:

- persistent: one program per SM walks the output tiles (grouped order for L2 reuse), so a tile's epilogue
  overlaps the next tile's loads;
- the streamed operands (x and W forward, g and W for dx) and the output through TMA tensor descriptors
  (``tl.make_tensor_descriptor``, Triton ≥ 3.4; the GPU machine has 3.6): no address math or masks in the
  main loop, the hardware zero-fills past the edges;
- the epilogue stored in two halves where the tile is 128 or more wide (fewer live registers at the store).

The adapter is the fused kernels': forward, ``+ (t · λeff) Pᵀ`` as one more r-wide product on the accumulator
(and the bias); dx, ``+ drop'(u Q)`` with the mask regenerated from the seed (the same Philox words as every
Triton kernel, so the mask bits do not depend on the route or the tiling). Its r-wide operands are small and
loaded by pointer.

The launchers take this path where ``usable`` says so (the target is sm_90+, the dtype is 16-bit, every
streamed tensor has unit column stride and 16-byte aligned rows); otherwise the portable kernels run. Descriptors
made on the device need a scratch allocation at launch, which Triton asks of ``triton.set_allocator`` (per thread:
autograd's backward runs on another one), so each launch makes sure one is set.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .adalora_linear import _UNSPECIALISED, _dx_adapter, _forward_epilogue, _Launch, _sm_count, _swizzle, m_bucket
from .config import INTERPRET, get_hopper_configs, hopper_prune, target_arch

HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
# ADALORA_KERNELS_HOPPER_GEMMS=0 keeps the portable GEMMs on sm_90 as well (gpu_timing's bench times both ways)
ENABLED = os.environ.get("ADALORA_KERNELS_HOPPER_GEMMS", "1") != "0"
FORCE_IN_INTERPRETER = False  # the tests set it to run these kernels under TRITON_INTERPRET=1
_DTYPES = (torch.float16, torch.bfloat16)  # the GEMMs these are for; float32 (an FMA dot) stays portable


def usable(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether the Hopper kernels take a launch whose streamed 2-D tensors are ``tensors``: the compile target is
    sm_90 or later (or the interpreter, where the tests ask for it), the dtype 16-bit, and every tensor is non-empty
    with unit column stride and a 16-byte aligned start, row stride and row."""
    if not (HAS_DESCRIPTORS and ENABLED):
        return False
    if INTERPRET:  # where a test asks; float32 too there (the interpreter's dot is exact, the kernels dtype-generic)
        if not FORCE_IN_INTERPRETER or dtype not in (*_DTYPES, torch.float32):
            return False
    elif dtype not in _DTYPES or _arch(tensors[0]) < 90:
        return False
    size = dtype.itemsize
    return all(
        t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
        and (t.shape[1] * size) % 16 == 0
        for t in tensors
    )  # fmt: skip


@functools.cache
def _cuda_arch(index: int) -> int:
    """NVIDIA's compute capability of GPU ``index``; 0 on ROCm, whose capability numbers (9.4 for MI300) are not
    Hopper's and whose GPUs these kernels are not for."""
    if torch.version.hip is not None:
        return 0
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch(t: torch.Tensor) -> int:
    """The compute capability a launch on ``t`` compiles for: its GPU's (read once per device), or the driver's
    target where ``t`` is a CPU tensor (``aot.compile_only``'s sweep)."""
    return _cuda_arch(t.device.index) if t.is_cuda else target_arch()


@triton.jit
def _store_halves(desc, row0, col0, out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the BLOCK_M × BLOCK_N tile ``out`` through ``desc``, in two column halves where it is 128 or more
    wide (``_out_descriptor`` made ``desc`` for that)."""
    if BLOCK_N >= 128:
        left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        desc.store([row0, col0], left)
        desc.store([row0, col0 + BLOCK_N // 2], right)
    else:
        desc.store([row0, col0], out)


@triton.jit
def _out_descriptor(ptr, rows, cols, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output's descriptor, its block half a tile wide where ``_store_halves`` stores in halves."""
    if BLOCK_N >= 128:
        half = tl.make_tensor_descriptor(ptr, [rows, cols], [stride, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
        return half
    else:
        return tl.make_tensor_descriptor(ptr, [rows, cols], [stride, 1], block_shape=[BLOCK_M, BLOCK_N])


@triton.autotune(
    configs=get_hopper_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_ADAPTER", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": hopper_prune("fwd")},
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _tma_fwd_kernel(
    # pointers: x (M, K), W (N, K), b (N), t (M, R), P (N, R), λeff (R), y (M, N)
    x_ptr, w_ptr, b_ptr, t_ptr, p_ptr, lam_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_wn, stride_tm, stride_tr, stride_pn, stride_pr, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = _out_descriptor(y_ptr, M, N, stride_ym, BLOCK_M, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _swizzle(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0, col0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(x_desc.load([row0, k0]), w_desc.load([col0, k0]).T, acc, input_precision=DOT_PRECISION)
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        rn = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
        acc = _forward_epilogue(acc, b_ptr, t_ptr, p_ptr, lam_ptr, rows, rn, M, N, R,
                                stride_tm, stride_tr, stride_pn, stride_pr, x_ptr.dtype.element_ty,
                                HAS_BIAS, HAS_ADAPTER, DOT_PRECISION, BLOCK_R)  # fmt: skip
        _store_halves(y_desc, row0, col0, acc.to(y_ptr.dtype.element_ty), BLOCK_M, BLOCK_N)


@triton.autotune(
    configs=get_hopper_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_DROPOUT", "HAS_ADAPTER", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": hopper_prune("dx")},
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _tma_dx_kernel(
    # pointers: g (M, N), W (N, K), u (M, R) contiguous, Q (R, K), dx (M, K)
    g_ptr, w_ptr, u_ptr, q_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_gm, stride_wn, stride_qr, stride_qk, stride_dxm,
    seed: tl.int64, p, keep_scale: tl.float64,
    HAS_DROPOUT: tl.constexpr, HAS_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # output tiles: rows × BLOCK_N columns of in; BLOCK_K tiles the reduction over out
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[stride_gm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_K, BLOCK_N])
    dx_desc = _out_descriptor(dx_ptr, M, K, stride_dxm, BLOCK_M, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        pid_m, pid_k = _swizzle(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        row0, col0 = pid_m * BLOCK_M, pid_k * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            acc = tl.dot(g_desc.load([row0, n0]), w_desc.load([n0, col0]), acc, input_precision=DOT_PRECISION)
        if HAS_ADAPTER:
            rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
            cols = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
            acc += _dx_adapter(u_ptr, q_ptr, rows, cols, col0, M, K, R, stride_qr, stride_qk, seed, p, keep_scale,
                               HAS_DROPOUT, IS_FP64, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
        _store_halves(dx_desc, row0, col0, acc.to(dx_ptr.dtype.element_ty), BLOCK_M, BLOCK_N)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator(device: torch.device) -> None:
    """The device descriptors' scratch comes from torch's caching allocator, unless the caller set another."""
    if device.type != "cuda":
        return
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_torch_scratch)


def _grid(rows: int, cols: int, device: torch.device):
    sms = _sm_count(device)
    return sms, lambda c: (min(sms, triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(cols, c["BLOCK_N"])),)


_launch_fwd = _Launch(_tma_fwd_kernel)
_launch_dx = _Launch(_tma_dx_kernel)


def forward_gemm(x2, weight, bias, t, P, lam_eff, y, meta) -> None:
    """``y = x Wᵀ + b + (t · λeff) Pᵀ`` into ``y`` (M > 0; ``usable`` said yes for x2, weight and y)."""
    M, K = x2.shape
    N, R = P.shape
    _ensure_allocator(x2.device)
    sms, grid = _grid(M, N, x2.device)
    _launch_fwd(grid,
        x2, weight, bias if bias is not None else y, t, P, lam_eff, y, M, N, K, R, m_bucket(M),
        x2.stride(0), weight.stride(0), t.stride(0), t.stride(1), P.stride(0), P.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, HAS_ADAPTER=R > 0, NUM_SMS=sms, **meta,
    )  # fmt: skip


def dx_gemm(g2, weight, u, Q, dx, dropout_args: tuple, has_dropout: bool, has_adapter: bool, meta) -> None:
    """``dx = g W + drop'(u Q)`` into ``dx`` (M > 0; ``usable`` said yes for g2, weight and dx)."""
    M, N = g2.shape
    K = weight.shape[1]
    R = Q.shape[0]
    _ensure_allocator(g2.device)
    sms, grid = _grid(M, K, g2.device)
    _launch_dx(grid,
        g2, weight, u, Q, dx, M, N, K, R, m_bucket(M),
        g2.stride(0), weight.stride(0), Q.stride(0), Q.stride(1), dx.stride(0), *dropout_args,
        HAS_DROPOUT=has_dropout, HAS_ADAPTER=has_adapter, NUM_SMS=sms, **meta,
    )  # fmt: skip
