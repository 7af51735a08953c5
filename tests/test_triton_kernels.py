"""Triton-specific checks: the kernels really run, the dropout mask is tile-independent, r up to 128,
int64 offsets, and the GPU tier (bf16, autotuning)."""

import pytest
import torch

pytest.importorskip("triton")
from adalora_kernels.kernels import unavailable_reason

if unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")):
    pytest.skip("Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)", allow_module_level=True)

from helpers import DEVICE, keep_mask, make_inputs, max_err

import adalora_kernels as ak
from adalora_kernels.kernels.triton import adalora_linear as kmod
from adalora_kernels.reference import adalora_linear_backward_ref, adalora_linear_ref

S = 0.5


class _Spy:
    def __init__(self, launch, calls, name):
        self.launch, self.calls, self.name = launch, calls, name

    def __call__(self, grid, *args, **meta):
        self.calls.append(self.name)
        return self.launch(grid, *args, **meta)


def test_kernels_really_run_and_tuned_launches_give_the_same_result(monkeypatch):
    """Every kernel runs (none falls back to torch); the second call of a shape launches the tuned config
    without the autotuner (kmod._Launch) and computes the same, bit for bit."""
    from adalora_kernels.kernels.triton import hopper

    monkeypatch.setattr(hopper, "usable", lambda *a: False)  # the portable GEMMs here (on sm_90 too)
    calls = []
    names = ["shrink_fwd", "fused_fwd", "dt_bwd", "fused_dx_bwd", "rank_reduce_bwd"]
    for name in names:
        monkeypatch.setattr(kmod, f"_launch_{name}", _Spy(getattr(kmod, f"_launch_{name}"), calls, name))
    x, w, b, P, lam, Q, m = make_inputs((20,), 40, 24, 4, torch.float32, mask=True)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    results, tuned = [], []
    for _ in range(2):
        y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, dropout_p=0.2, seed=3, backend="triton")
        results.append((y, *torch.autograd.grad(y.sum(), leaves)))
        tuned.append({n: dict(getattr(kmod, f"_launch_{n}").launch.tuned) for n in names})
    one_call = ["shrink_fwd", "fused_fwd", "dt_bwd", "fused_dx_bwd", "rank_reduce_bwd", "rank_reduce_bwd"]  # dQ, dP
    assert calls == one_call * 2
    assert all(tuned[0][n] for n in names) and tuned[1] == tuned[0]  # the second call found every key tuned
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_dropout_mask_does_not_depend_on_tiles():
    import triton

    M, K, seed, p = 70, 136, 99, 0.4
    masks = []
    for bm, bk in [(16, 16), (32, 64), (64, 8)]:
        out = torch.empty(M, K, dtype=torch.int8, device=DEVICE)
        kmod._keep_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](out, M, K, seed, p, BLOCK_M=bm, BLOCK_K=bk)
        masks.append(out)
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    assert 0.55 < masks[0].float().mean().item() < 0.65
    other = keep_mask("triton", (M, K), p, seed + 1)
    assert not torch.equal(masks[0].bool(), other)


def test_dropout_rows_and_columns_are_independent():
    keep = keep_mask("triton", (256, 256), 0.5, 1).float()
    assert keep.mean(0).std() < 0.06 and keep.mean(1).std() < 0.06  # no striping by row or column
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 4])


@pytest.mark.parametrize("r", [1, 17, 64, 128])
def test_ranks_up_to_128(r):
    x, w, b, P, lam, Q, m = make_inputs((33,), 48, 40, r, torch.float64, mask=True)
    keep = keep_mask("triton", (33, 48), 0.1, 4)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, dropout_p=0.1, seed=4, backend="triton")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    torch.testing.assert_close(y, adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, 0.1))
    for a, e in zip(grads, adalora_linear_backward_ref(g, x, w, P, lam, Q, S, m, keep, 0.1)):
        torch.testing.assert_close(a, e)


def test_int64_offsets():
    """Rows more than 2**31 elements apart: offsets computed in int32 would wrap."""
    rows, in_f, out_f, r = 3, 16, 16, 2
    stride = 2**30 + 16
    storage = torch.empty(stride * (rows - 1) + in_f, dtype=torch.float16, device=DEVICE)  # untouched pages
    x = storage.as_strided((rows, in_f), (stride, 1))
    x.copy_(torch.randn(rows, in_f, dtype=torch.float16))
    _, w, b, P, lam, Q, _ = make_inputs((rows,), in_f, out_f, r, torch.float16)
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, backend="triton")
    ref = adalora_linear_ref(x.clone(), w, b, P, lam, Q, S, upcast=True)
    assert max_err(y, ref) < 1e-2
    del storage, x


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "lead,in_f,out_f,r", [((37,), 123, 431, 3), ((2, 512), 1024, 768, 16), ((4096,), 256, 512, 64)]
)
def test_bf16_on_gpu(lead, in_f, out_f, r, p):
    x, w, b, P, lam, Q, m = make_inputs(lead, in_f, out_f, r, torch.bfloat16, mask=True)
    keep = keep_mask("triton", (x.numel() // in_f, in_f), p, 8) if p else None
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, dropout_p=p, seed=8, backend="triton")
    g = torch.randn_like(y)
    outs = [y, *torch.autograd.grad(y, leaves, g)]
    refs = [adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, p, upcast=True)]
    refs += adalora_linear_backward_ref(g, x, w, P, lam, Q, S, m, keep, p, upcast=True)
    plain = [adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, p)]
    plain += adalora_linear_backward_ref(g, x, w, P, lam, Q, S, m, keep, p)
    for name, o, ref, pl in zip(["y", "dx", "dP", "dlam", "dQ"], outs, refs, plain):
        assert max_err(o, ref) <= 2 * max_err(pl, ref) + 1e-2 * ref.abs().max().item(), name


@pytest.mark.gpu
def test_autotuned_configs_agree_on_gpu(monkeypatch):
    from adalora_kernels.kernels.triton.config import get_autotune_configs

    assert len(get_autotune_configs()) > 1
    x, w, b, P, lam, Q, m = make_inputs((1000,), 512, 384, 16, torch.float32, mask=True)
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, backend="triton")
    ref = adalora_linear_ref(x, w, b, P, lam, Q, S, m, upcast=True)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()


def test_tiles_are_pruned_to_fit_shared_memory(monkeypatch):
    """fp64 and r = 128 shrink the tiles; with autotuning off exactly one tile is kept (CPU-checkable logic)."""
    import triton

    from adalora_kernels.kernels.triton import config

    monkeypatch.setattr(config, "shared_memory_bytes", lambda: 228 * 1024)  # an H100/H200
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_stages=2)
    args16 = {"x_ptr": torch.empty(1, dtype=torch.float16)}
    args64 = {"x_ptr": torch.empty(1, dtype=torch.float64)}
    monkeypatch.setattr(config, "autotune_enabled", lambda: False)
    assert config.prune_by_shared_memory([big, small], args16, BLOCK_R=16) == [big]
    assert config.prune_by_shared_memory([big, small], args64, BLOCK_R=16) == [small]
    monkeypatch.setattr(config, "autotune_enabled", lambda: True)
    assert config.prune_by_shared_memory([big, small], args16, BLOCK_R=128) == [big, small]
    assert config.prune_by_shared_memory([big], args64, BLOCK_R=128) == [big]  # none fits: the least hungry


def test_the_interpreter_shim_is_applied_where_triton_needs_it(monkeypatch):
    """Triton < 3.8 under NumPy >= 2.4 fails every interpreted scalar index (triton-lang/triton#9171): the shim
    is applied exactly there, and the interpreter tier above runs through it on such versions (CI's version leg)."""
    import numpy
    import triton

    from adalora_kernels.kernels.triton import interpreter_compat

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, needed in [("3.6.0", "2.4.6", True), ("3.8.0", "2.4.6", False),
                                                  ("3.6.0", "2.3.1", False), ("3.9.0", "2.5.0", False)]:  # fmt: skip
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        assert interpreter_compat.needed() is needed, (triton_version, numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_compat.needed()
