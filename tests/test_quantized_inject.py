"""Our own layers on bitsandbytes bases (``inject_adalora`` → ``AdaLoRAQuantizedLinear``) side by side with PEFT's
``SVDLinear4bit`` / ``SVDLinear8bitLt`` holding the same adapters: outputs, dx and every adapter gradient, a training
run with our ``RankAllocator`` against PEFT's allocator, the regulariser, our checkpoints and PEFT's adapter folders
both ways, and the refusals (merge, an unsupported quantised type)."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the quantised bases are not tested")

from test_quantized import KINDS, _Net  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import export_lora, export_peft, import_peft, load_adalora, save_adalora  # noqa: E402

NAMES = ["a", "b"]


def _flag(net, kind):
    setattr(net, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return net


def _pair(kind, dropout=0.0, **shape):
    """PEFT's model over a quantised net, and ours over a copy of that net with the same adapters."""
    net = _flag(_Net(kind, **shape), kind)
    ours = copy.deepcopy(net)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=14, tinit=2, tfinal=3, deltaT=2, lora_alpha=8,
                             lora_dropout=dropout, target_modules=NAMES)  # fmt: skip
    plain = peft.get_peft_model(net, cfg)
    assert ak.inject_adalora(ours, NAMES, init_r=6, lora_alpha=8, lora_dropout=dropout) == NAMES
    for n in NAMES:
        svd, layer = getattr(plain.base_model.model, n), getattr(ours, n)
        assert isinstance(layer, ak.AdaLoRAQuantizedLinear)
        with torch.no_grad():
            svd.lora_E["default"].normal_()
            layer.P.copy_(svd.lora_B["default"])
            layer.lam.copy_(svd.lora_E["default"].view(-1))
            layer.Q.copy_(svd.lora_A["default"])
    return plain, ours


def _adapter_grads(plain, ours):
    pairs = []
    for n in NAMES:
        svd, layer = getattr(plain.base_model.model, n), getattr(ours, n)
        pairs += [(svd.lora_B["default"].grad, layer.P.grad), (svd.lora_E["default"].grad.view(-1), layer.lam.grad),
                  (svd.lora_A["default"].grad, layer.Q.grad)]  # fmt: skip
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [{}, {"in_f": 123, "mid": 37, "out_f": 16}])
def test_injected_quantized_layers_compute_as_peft(kind, shape):
    plain, ours = _pair(kind, **shape)
    layer = ours.a
    assert isinstance(layer, ak.AdaLoRAQuantizedLinear) and layer.quant_kind == kind
    assert layer.P.dtype == torch.float32 and not any(p.requires_grad for p in layer.base_layer.parameters())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == [
        f"{n}.{t}" for n in NAMES for t in ("P", "Q", "lam")
    ]
    x = torch.randn(3, 5, shape.get("in_f", 64))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [plain(xs[0]), ours(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)
    for theirs, mine in _adapter_grads(plain, ours):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_run_with_our_allocator_and_regulariser_gives_peft_s_rank_patterns(kind):
    plain, ours = _pair(kind)
    alloc = ak.RankAllocator(ours, target_r=2, total_step=14, tinit=2, tfinal=3, deltaT=2)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, ours)]
    gen = torch.Generator().manual_seed(0)
    for step in range(14):
        x, target = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
        # PEFT's regulariser (AdaLoraModel.forward adds it to a model output's loss): computed here on its layers
        theirs = [getattr(plain.base_model.model, n) for n in NAMES]
        reg_theirs = ak.orthogonal_regularization_of([m.lora_B["default"] for m in theirs],
                                                     [m.lora_A["default"] for m in theirs])  # fmt: skip
        reg_ours = ak.orthogonal_regularization(ours)
        torch.testing.assert_close(reg_ours, reg_theirs, rtol=1e-6, atol=1e-7)
        losses = []
        for model, opt, reg in zip((plain, ours), opts, (reg_theirs, reg_ours)):
            loss = (model(x) - target).square().mean() + 0.1 * reg
            loss.backward()
            opt.step()
            plain.base_model.update_and_allocate(step) if model is plain else alloc.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), step
        pattern = plain.peft_config["default"].rank_pattern
        if pattern is not None:
            assert alloc.rank_pattern == {n: pattern[f"{n}.lora_E.default"] for n in NAMES}, step
    assert alloc.rank_pattern is not None and sum(map(sum, alloc.rank_pattern.values())) == 4


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_checkpoints_both_ways_on_quantized_bases(kind, tmp_path):
    plain, ours = _pair(kind)
    ours.eval(), plain.eval()
    x = torch.randn(4, 64)
    torch.set_grad_enabled(False)  # (bitsandbytes runs another kernel where its input requires grad)
    try:
        ours.b.rank_mask[::2] = False
        expected = ours(x)
        # ours -> ours: a fresh quantised net gets the layers injected, pruned ranks kept
        save_adalora(ours, tmp_path / "ours")
        fresh = _flag(_Net(kind), kind).eval()
        assert load_adalora(fresh, tmp_path / "ours") == NAMES
        assert isinstance(fresh.b, ak.AdaLoRAQuantizedLinear)
        assert fresh.b.rank_mask.tolist() == ours.b.rank_mask.tolist() == [False, True] * 3
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
        # ours -> PEFT: plain PEFT loads the exported folder onto its own quantised layers, with our outputs
        export_peft(ours, tmp_path / "peft")
        loaded = peft.PeftModel.from_pretrained(_flag(_Net(kind), kind), tmp_path / "peft").eval()
        assert type(loaded.base_model.model.a).__name__ in ("SVDLinear4bit", "SVDLinear8bitLt")
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        # PEFT -> ours
        into = _flag(_Net(kind), kind).eval()
        assert import_peft(into, tmp_path / "peft") == NAMES
        torch.testing.assert_close(into(x), expected, rtol=1e-5, atol=1e-5)
        # ours -> a PEFT LoRA adapter over the same quantised layers
        export_lora(ours, tmp_path / "lora")
        lora = peft.PeftModel.from_pretrained(_flag(_Net(kind), kind), tmp_path / "lora").eval()
        assert type(lora.base_model.model.a).__module__.endswith("lora.bnb")
        torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_grad_enabled(True)


def test_merge_is_refused_and_the_layer_stays_as_it_was():
    _, ours = _pair("nf4")
    x = torch.randn(2, 64)
    before = ours(x)
    for call in (ours.a.merge, ours.a.unmerge):
        with pytest.raises(TypeError, match=r"bitsandbytes nf4 layer .*requantise"):
            call()
    assert not ours.a.merged
    torch.testing.assert_close(ours(x), before, rtol=0, atol=0)


def test_unsupported_bases_are_refused_by_type_and_nothing_changes():
    class PackedInt4Linear(nn.Module):  # a quantised layer of some other library
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8, 4, dtype=torch.uint8), requires_grad=False)

        def forward(self, x):
            return x

    model = nn.Module()
    model.q, model.l = PackedInt4Linear(), nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"q is a PackedInt4Linear.*bitsandbytes' Linear4bit and Linear8bitLt"):
        ak.inject_adalora(model, ["q", "l"])
    assert type(model.l) is nn.Linear and model.l.weight.requires_grad  # nothing was frozen or replaced
    with pytest.raises(TypeError, match="base: expected a bitsandbytes Linear4bit or Linear8bitLt, got Linear"):
        ak.AdaLoRAQuantizedLinear.from_base(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"AdaLoRAQuantizedLinear\.from_base"):
        ak.AdaLoRALinear.from_linear(_Net("nf4").a)
    with pytest.raises(TypeError, match="adapter_dtype"):
        ak.AdaLoRAQuantizedLinear.from_base(_Net("nf4").a, adapter_dtype=torch.int8)
