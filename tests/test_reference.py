"""The closed-form backward of the reference equals autograd through its forward (fp64)."""

import pytest
import torch
from helpers import make_inputs

from adalora_kernels.reference import adalora_linear_backward_ref, adalora_linear_ref, peft_scaling


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("lead,in_f,out_f,r", [((1,), 5, 7, 1), ((2, 37), 123, 43, 3), ((4,), 16, 16, 0)])
def test_closed_form_backward_matches_autograd(lead, in_f, out_f, r, mask, dropout_p):
    x, w, b, P, lam, Q, m = make_inputs(lead, in_f, out_f, r, torch.float64, mask=mask, device="cpu")
    keep = torch.rand(x.reshape(-1, in_f).shape, generator=torch.Generator().manual_seed(1)) > dropout_p
    keep = keep if dropout_p > 0 else None
    s = peft_scaling(max(r, 1), 8)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = adalora_linear_ref(x, w, b, P, lam, Q, s, m, keep, dropout_p)
    g = torch.randn_like(y)
    auto = torch.autograd.grad(y, leaves, g, allow_unused=True)
    closed = adalora_linear_backward_ref(g, x, w, P, lam, Q, s, m, keep, dropout_p)
    for a, c in zip(auto, closed):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(c), c, rtol=1e-12, atol=1e-12)


def test_peft_scaling():
    assert peft_scaling(12, 8) == 8 / (12 + 1e-5)
    assert peft_scaling(4, 0) == 4 / (4 + 1e-5)  # lora_alpha <= 0 falls back to r
