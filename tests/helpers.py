"""Shared test helpers: inputs, backends that can run here, tolerances by dtype."""

from __future__ import annotations

import torch

from adalora_kernels.kernels import get_backend, unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")  # for tests whose models are built on the CPU whatever the machine has


def runnable_backends(device: torch.device = DEVICE) -> list[str]:
    names = ["torch", "triton", "triton_split", "csrc"]
    from adalora_kernels.kernels import backend_names

    return [n for n in names if n in backend_names() and unavailable_reason(n, device) is None]


def keep_mask(backend: str, shape, p: float, seed: int, device=DEVICE):
    return get_backend(backend, device).dropout_keep_mask(tuple(shape), p, seed, device)


def make_inputs(lead, in_f, out_f, r, dtype, *, bias=True, mask=False, device=DEVICE, seed=0, lam_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(*lead, in_f)
    weight = rnd(out_f, in_f, scale=in_f**-0.5)
    b = rnd(out_f) if bias else None
    P = rnd(out_f, r, scale=0.3)
    lam = rnd(r, scale=lam_scale)
    Q = rnd(r, in_f, scale=0.3)
    rank_mask = (torch.rand(r, generator=g) > 0.4).to(device) if mask else None
    return x, weight, b, P, lam, Q, rank_mask


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
