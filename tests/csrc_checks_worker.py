"""Run in a fresh subprocess by ``test_csrc.py`` (with faulthandler on): every op of the native extension, given a
bad input on the device named by argv[1], must raise a Python exception; a crash (a signal) kills this process
instead, which the test sees. Prints one JSON object: op → the exception's type and first line, or "returned".

argv[1] ``cuda-kernels``: the CUDA build's kernels without a GPU: CPU tensors sent straight to each op's CUDA
kernel (``OpOverload.redispatch`` with the CUDA dispatch key), whose checks must reject them (the bad shape, or
the device) by raising, from the code a CUDA tensor reaches; ops without a CUDA kernel are left out."""

import json
import sys

import torch

import adalora_kernels.kernels.csrc  # noqa: F401  (loads the extension)

ops = torch.ops.adalora_kernels
cuda_kernels = sys.argv[1] == "cuda-kernels"
device = torch.device("cpu" if cuda_kernels else sys.argv[1])


def t(*shape):
    return torch.randn(*shape, device=device)


def op(name):
    """The op to call: as a user would, or (``cuda-kernels``) its CUDA kernel whatever the tensors' device."""
    if not cuda_kernels:
        return getattr(ops, name)
    overload = getattr(ops, name).default
    return lambda *args: overload.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


x, w, P, lam, Q = t(5, 8), t(6, 8), t(6, 3), t(3), t(3, 8)
calls = {
    "csrc_linear_fwd": lambda: op("csrc_linear_fwd")(t(5, 8, 1), w, None, P, lam, Q, 0.1, 1),
    "csrc_linear_bwd": lambda: op("csrc_linear_bwd")(t(5, 7), x, w, P, lam, Q, t(5, 3), 0.1, 1, True, True),
    "csrc_adalora_linear": lambda: op("csrc_adalora_linear")(x, w, None, t(6, 4), lam, Q, None, 1.0, 0.0, 0),
    "csrc_dropout_keep_mask": lambda: op("csrc_dropout_keep_mask")(x, 4, 4, 1.0, 1),
    "csrc_sensitivity_update": lambda: op("csrc_sensitivity_update")(
        [P, lam], [P, lam], [P, lam], [P, lam], 0.85, 0.85
    ),
}
if cuda_kernels:  # and arguments whose only fault is their device, for the device check
    calls["csrc_linear_fwd (device)"] = lambda: op("csrc_linear_fwd")(x, w, None, P, lam, Q, 0.1, 1)
    calls["csrc_linear_bwd (device)"] = lambda: op("csrc_linear_bwd")(t(5, 6), x, w, P, lam, Q, t(5, 3), 0.1, 1,
                                                                      True, True)  # fmt: skip
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    calls = {k: call for k, call in calls.items() if has_kernel(f"adalora_kernels::{k.split()[0]}", "CUDA")}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "returned"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
print(json.dumps(out))
