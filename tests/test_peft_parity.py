"""``AdaLoRALinear`` against PEFT 0.21's ``SVDLinear`` on the same weights: outputs and gradients."""

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from helpers import DEVICE, keep_mask, runnable_backends  # noqa: E402

import adalora_kernels as ak  # noqa: E402


class _MaskDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with a given keep mask, so both sides drop the same entries."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape).to(x.dtype) / (1 - self.p)


def peft_layer(in_f, out_f, init_r, alpha, dropout, dtype, bias=True):
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(in_f, out_f, bias=bias))
    cfg = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=max(init_r // 2, 1),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["lin"],
        total_step=10,
    )
    pm = peft.get_peft_model(model, cfg).to(device=DEVICE, dtype=dtype)
    svd = pm.base_model.model.lin
    with torch.no_grad():
        svd.lora_E["default"].normal_()  # PEFT starts lam at zero: make the adapter matter
    return svd


def ours_from(svd, alpha, dropout, backend):
    base = svd.get_base_layer()
    r = svd.r["default"]
    layer = ak.AdaLoRALinear.from_linear(base, init_r=r, lora_alpha=alpha, lora_dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.P.copy_(svd.lora_B["default"])
        layer.lam.copy_(svd.lora_E["default"].view(-1))
        layer.Q.copy_(svd.lora_A["default"])
    return layer


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "lead,in_f,out_f,init_r,alpha,dropout,bias",
    [
        ((4, 9), 32, 24, 12, 8, 0.0, True),
        ((37,), 123, 43, 3, 32, 0.1, False),
        ((1,), 16, 431, 1, 0, 0.3, True),
    ],
)
def test_outputs_and_grads_match_peft(backend, dtype, lead, in_f, out_f, init_r, alpha, dropout, bias):
    torch.manual_seed(0)
    svd = peft_layer(in_f, out_f, init_r, alpha, dropout, dtype, bias)
    ours = ours_from(svd, alpha, dropout, backend)
    x = torch.randn(*lead, in_f, device=DEVICE, dtype=dtype)
    seed = 1234
    if dropout > 0:
        svd.lora_dropout["default"] = _MaskDropout(
            keep_mask(backend, (x.numel() // in_f, in_f), dropout, seed), dropout
        )
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft = svd(x_peft)
    y_ours = ak.adalora_linear(
        x_ours,
        ours.weight,
        ours.bias,
        ours.P,
        ours.lam,
        ours.Q,
        scaling=ours.scaling,
        rank_mask=ours.rank_mask,
        dropout_p=dropout,
        seed=seed,
        backend=backend,
    )
    g = torch.randn_like(y_peft)
    peft_grads = torch.autograd.grad(
        y_peft, [x_peft, svd.lora_B["default"], svd.lora_E["default"], svd.lora_A["default"]], g
    )
    our_grads = torch.autograd.grad(y_ours, [x_ours, ours.P, ours.lam, ours.Q], g)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y_ours, y_peft, **tol)
    for name, a, b in zip(["dx", "dP", "dlam", "dQ"], our_grads, peft_grads):
        torch.testing.assert_close(a, b.reshape(a.shape), **tol, msg=lambda s, n=name: f"{n}: {s}")


def test_module_forward_matches_peft_in_eval_mode():
    torch.manual_seed(3)
    svd = peft_layer(40, 30, 6, 16, 0.2, torch.float64).eval()
    ours = ours_from(svd, 16, 0.2, None).eval()
    x = torch.randn(2, 7, 40, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(ours(x), svd(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.delta_weight(), svd.get_delta_weight("default"), rtol=1e-10, atol=1e-12)
