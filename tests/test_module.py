"""``AdaLoRALinear``: the nn.Linear surface, PEFT's initialisation, merge/unmerge, bad input."""

import pytest
import torch
from torch import nn

import adalora_kernels as ak
from adalora_kernels.reference import adalora_linear_ref


def test_nn_linear_surface_and_init():
    torch.manual_seed(0)
    layer = ak.AdaLoRALinear(300, 200, init_r=12, lora_alpha=8)
    assert (layer.in_features, layer.out_features) == (300, 200)
    assert layer.weight.shape == (200, 300) and layer.bias.shape == (200,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.P.shape == (200, 12) and layer.lam.shape == (12,) and layer.Q.shape == (12, 300)
    assert layer.rank_mask.dtype == torch.bool and bool(layer.rank_mask.all())
    assert torch.count_nonzero(layer.lam) == 0
    assert abs(layer.P.std().item() - 0.02) < 2e-3 and abs(layer.Q.std().item() - 0.02) < 2e-3
    assert layer.scaling == 8 / (12 + 1e-5)
    assert ak.AdaLoRALinear(4, 4, init_r=6, lora_alpha=0).scaling == 6 / (6 + 1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"P", "lam", "Q"}
    assert "rank_mask" in layer.state_dict()
    assert "init_r=12" in repr(layer) and "lora_alpha=8" in repr(layer)
    x = torch.randn(2, 3, 300)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # lam = 0


def test_from_linear_shares_and_freezes():
    lin = nn.Linear(16, 8, bias=False)
    layer = ak.AdaLoRALinear.from_linear(lin, init_r=4, lora_alpha=16, lora_dropout=0.1)
    assert layer.weight is lin.weight and layer.bias is None
    assert not lin.weight.requires_grad
    assert layer.lora_dropout == 0.1 and layer.scaling == 16 / (4 + 1e-5)
    with pytest.raises(TypeError, match=r"linear: expected an nn\.Linear"):
        ak.AdaLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_rank_zero_layer():
    layer = ak.AdaLoRALinear(10, 6, init_r=0)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_forward_follows_rank_mask_and_matches_reference():
    torch.manual_seed(1)
    layer = ak.AdaLoRALinear(20, 12, init_r=5, dtype=torch.float64)
    nn.init.normal_(layer.lam)
    layer.rank_mask[1] = False
    x = torch.randn(3, 20, dtype=torch.float64)
    ref = adalora_linear_ref(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, layer.scaling, layer.rank_mask)
    torch.testing.assert_close(layer(x), ref)
    lam_zeroed = layer.lam.detach().clone()
    lam_zeroed[1] = 0
    ref0 = adalora_linear_ref(x, layer.weight, layer.bias, layer.P, lam_zeroed, layer.Q, layer.scaling)
    torch.testing.assert_close(layer(x), ref0)


def test_merge_unmerge_round_trip():
    torch.manual_seed(2)
    layer = ak.AdaLoRALinear(24, 18, init_r=6, lora_dropout=0.3, dtype=torch.float64).eval()
    nn.init.normal_(layer.lam)
    layer.rank_mask[0] = False
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 24, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(layer.delta_weight() + w0, layer.weight)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), before)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_r": -1}, "init_r: expected an int >= 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout: expected a float in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout: expected a float in \[0, 1\)"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ak.AdaLoRALinear(4, 4, **kwargs)
