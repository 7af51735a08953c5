"""The batched orthogonal regulariser equals PEFT's, value and gradient."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import adalora_kernels as ak  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x):
        return SimpleNamespace(loss=self.c(self.a(x) + self.b(x)).square().mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_equal_peft(dtype):
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=5, target_r=2, total_step=10, target_modules=["a", "b", "c"], orth_reg_weight=0.5)
    pm = peft.get_peft_model(_Net(), cfg).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    with_reg = pm.base_model(x).loss  # AdaLoraModel.forward adds the regulariser
    pm.peft_config["default"].orth_reg_weight = 0.0
    without = pm.base_model(x).loss
    peft_reg = (with_reg - without) / 0.5
    svds = [getattr(pm.base_model.model, n) for n in "abc"]
    Ps = [s.lora_B["default"] for s in svds]
    Qs = [s.lora_A["default"] for s in svds]
    ours = ak.orthogonal_regularization_of(Ps, Qs)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours, peft_reg.detach(), **tol)
    ref = sum(torch.norm(Q @ Q.T - torch.eye(5, dtype=dtype)) + torch.norm(P.T @ P - torch.eye(5, dtype=dtype))
              for P, Q in zip(Ps, Qs)) / 6  # fmt: skip
    g_ours = torch.autograd.grad(ours, Ps + Qs)
    g_ref = torch.autograd.grad(ref, Ps + Qs)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **tol)


def test_model_entry_point_and_batching(monkeypatch):
    model = nn.Sequential(*[ak.AdaLoRALinear(12, 12, init_r=4) for _ in range(5)], ak.AdaLoRALinear(12, 3, init_r=4))
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape) or real_bmm(a, b))
    value = ak.orthogonal_regularization(model)
    expected = sum(torch.norm(m.Q @ m.Q.T - torch.eye(4)) + torch.norm(m.P.T @ m.P - torch.eye(4)) for m in model) / (
        2 * len(model)
    )
    torch.testing.assert_close(value, expected)
    assert sorted(calls) == [(1, 4, 3), (5, 4, 12), (6, 4, 12)]  # one product per kind (P, Q) and shape
    with pytest.raises(ValueError, match="model: no AdaLoRALinear layer found"):
        ak.orthogonal_regularization(nn.Linear(2, 2))
