"""Run in a fresh subprocess by ``test_csrc.py`` (with faulthandler on): every op of the native extension, given a
bad input on the device named by argv[1], must raise a Python exception; a crash (a signal) kills this process
instead, which the test sees. Prints one JSON object: op → the exception's type and first line, or "returned"."""

import json
import sys

import torch

import adalora_kernels.kernels.csrc  # noqa: F401  (loads the extension)

ops = torch.ops.adalora_kernels
device = torch.device(sys.argv[1])


def t(*shape):
    return torch.randn(*shape, device=device)


x, w, P, lam, Q = t(5, 8), t(6, 8), t(6, 3), t(3), t(3, 8)
calls = {
    "csrc_linear_fwd": lambda: ops.csrc_linear_fwd(t(5, 8, 1), w, None, P, lam, Q, 0.1, 1),
    "csrc_linear_bwd": lambda: ops.csrc_linear_bwd(t(5, 7), x, w, P, lam, Q, t(5, 3), 0.1, 1, True, True),
    "csrc_adalora_linear": lambda: ops.csrc_adalora_linear(x, w, None, t(6, 4), lam, Q, None, 1.0, 0.0, 0),
    "csrc_dropout_keep_mask": lambda: ops.csrc_dropout_keep_mask(x, 4, 4, 1.0, 1),
    "csrc_sensitivity_update": lambda: ops.csrc_sensitivity_update([P, lam], [P, lam], [P, lam], [P, lam], 0.85, 0.85),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "returned"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
print(json.dumps(out))
