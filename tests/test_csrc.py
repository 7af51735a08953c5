"""The native (csrc) backend: its TORCH_CHECKs and its dropout mask (the maths is in the shared tests)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, keep_mask, runnable_backends

if "csrc" not in runnable_backends():
    pytest.skip("the native extension is not built here", allow_module_level=True)

ops = torch.ops.adalora_kernels


def args(**over):
    x = torch.randn(5, 8, device=DEVICE)
    shapes = {"weight": (6, 8), "P": (6, 3), "lam": (3,), "Q": (3, 8)}
    base = {"x": x, "bias": None} | {k: torch.randn(s, device=DEVICE) for k, s in shapes.items()}
    base = {k: base[k] for k in ("x", "weight", "bias", "P", "lam", "Q")} | {"p": 0.1, "seed": 1}
    base.update(over)
    return list(base.values())


@pytest.mark.parametrize(
    "over,message",
    [
        ({"x": torch.randn(5, 8, 1)}, r"csrc_linear_fwd: x must be 2-D \(rows, in_features\)"),
        ({"weight": torch.randn(6, 7)}, r"weight must be \(out_features, 8\) to match x"),
        ({"P": torch.randn(6, 4)}, r"P must be \(6, 3\)"),
        ({"Q": torch.randn(3, 9)}, r"Q must be \(3, 8\)"),
        ({"lam": torch.randn(3, 1)}, r"lam_eff must be 1-D \(r,\)"),
        ({"P": torch.randn(6, 3, dtype=torch.float64)}, r"every input must have x's dtype Float, got Double"),
        ({"p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ],
)
def test_forward_checks(over, message):
    with pytest.raises(RuntimeError, match=message):
        ops.csrc_linear_fwd(*args(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in over.items()}))


def test_backward_and_sensitivity_checks():
    x, w, _, P, lam, Q, p, seed = args()
    t = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"csrc_linear_bwd: grad must be \(5, 6\)"):
        ops.csrc_linear_bwd(torch.randn(5, 7, device=DEVICE), x, w, P, lam, Q, t, p, seed, True, True)
    with pytest.raises(RuntimeError, match=r"csrc_linear_bwd: t must be \(5, 3\)"):
        ops.csrc_linear_bwd(torch.randn(5, 6, device=DEVICE), x, w, P, lam, Q, t[:, :2], p, seed, True, True)
    triple = [P, lam, Q]
    with pytest.raises(RuntimeError, match=r"expected \(P, lam, Q\) triples"):
        ops.csrc_sensitivity_update(triple[:2], triple[:2], triple[:2], triple[:2], 0.85, 0.85)
    with pytest.raises(RuntimeError, match="must be a contiguous"):
        ops.csrc_sensitivity_update(triple, triple, [P, lam, Q.T.contiguous().T], triple, 0.85, 0.85)
    with pytest.raises(RuntimeError, match=r"beta1 and beta2 must be in \(0, 1\)"):
        ops.csrc_sensitivity_update(triple, triple, triple, triple, 1.0, 0.85)


def test_mask_rate_independence_and_determinism():
    keep = keep_mask("csrc", (512, 512), 0.3, 5)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert keep.float().mean(0).std() < 0.05 and keep.float().mean(1).std() < 0.05
    assert torch.equal(keep, keep_mask("csrc", (512, 512), 0.3, 5))
    assert not torch.equal(keep, keep_mask("csrc", (512, 512), 0.3, 6))
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    # the mask of a row depends on the row, not on how many rows there are
    assert torch.equal(keep_mask("csrc", (70, 512), 0.3, 5), keep[:70])


def _run_with_isa(isa: str, script: str) -> subprocess.CompletedProcess:
    tests = os.path.dirname(os.path.abspath(__file__))
    # the tests' folder for the helpers, the source tree for the package where it is not installed
    path = os.pathsep.join([tests, os.path.dirname(tests), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "ADALORA_KERNELS_CPU_ISA": isa, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=tests, capture_output=True, text=True)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_float32_kernels_of_every_instruction_set(isa):
    """The float32 rank-r kernels are built per instruction set and the widest one runs here; force the
    others (ADALORA_KERNELS_CPU_ISA, read once per process) and check them against the fp64 reference."""
    script = (
        "import torch\n"
        "from test_adalora_linear import SHAPES, check_against_reference\n"
        "for lead, i, o, r in SHAPES:\n"
        "    check_against_reference('csrc', torch.float32, lead, i, o, r, mask=r > 2)\n"
        "    check_against_reference('csrc', torch.float32, lead, i, o, r, bias=False, p=0.2)\n"
    )
    done = _run_with_isa(isa, script)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_the_mask_of_every_instruction_set_is_the_references(isa):
    """The keep-mask is drawn by a version per instruction set (16 or 8 Philox calls at once, or one); each, forced,
    draws the reference's bits: every column count to 70 (tails of every length), blocks of rows past the first,
    seeds with high bits set, rates at both ends. (A set the CPU lacks falls back to the widest it has.)"""
    done = _run_with_isa(
        isa, "from test_dropout_mask import check_the_csrc_mask_at_every_tail\ncheck_the_csrc_mask_at_every_tail()"
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_unknown_instruction_set_is_refused():
    script = (
        "import torch, adalora_kernels as ak\nak.AdaLoRALinear(8, 4, init_r=2, backend='csrc')(torch.randn(3, 8))\n"
    )
    done = _run_with_isa("avx3", script)
    assert (
        done.returncode != 0 and "ADALORA_KERNELS_CPU_ISA: expected baseline, avx2 or avx512, got 'avx3'" in done.stderr
    )


def _cuda_kernels_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("adalora_kernels::csrc_linear_fwd", "CUDA")


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.gpu),
        pytest.param(
            "cuda-kernels",
            marks=pytest.mark.skipif(not _cuda_kernels_built(), reason="the extension is built without CUDA"),
        ),
    ],
)
def test_every_op_raises_on_bad_input_and_never_crashes(device):
    """A failed check in the extension is a Python exception, on every op and build, never a signal: in a fresh
    process, with faulthandler on, so a crash is this test's failure and its traceback, not the end of the run.
    ``cpu``: the CPU kernels of either build; ``cuda``: CUDA tensors on a GPU; ``cuda-kernels``: the CUDA build's
    kernels reached without a GPU (CI's version leg), CPU tensors redispatched to them, rejected for their shape
    and for their device."""
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([tests, os.path.dirname(tests), *filter(None, [os.environ.get("PYTHONPATH")])])
    worker = [sys.executable, "-X", "faulthandler", os.path.join(tests, "csrc_checks_worker.py"), device]
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (a negative one is a signal):\n{done.stderr[-4000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for op, what in results.items():
        assert what.startswith(("RuntimeError", "ValueError", "TypeError", "IndexError")), (op, what)
    if device == "cuda-kernels":
        every = {"csrc_linear_fwd", "csrc_linear_bwd", "csrc_dropout_keep_mask", "csrc_sensitivity_update"}
        assert every | {f"{op} (device)" for op in ("csrc_linear_fwd", "csrc_linear_bwd")} <= set(results), results
        assert all(
            "expected CUDA tensors" in results[f"{op} (device)"] for op in ("csrc_linear_fwd", "csrc_linear_bwd")
        )
