"""AdaLoRA on bitsandbytes 4-bit (nf4, fp4) and int8 bases, after ``accelerate_peft``, side by side with PEFT's own
``SVDLinear4bit`` / ``SVDLinear8bitLt``: outputs, every adapter gradient and dx, rank patterns over a run with the
allocator, save/load and disabled adapters; and the adapter-only op against the fp64 reference."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the quantised bases are not tested")

from helpers import runnable_backends  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.ops import adalora_adapter, adapter_bwd, adapter_fwd  # noqa: E402

KINDS = ["nf4", "fp4", "int8"]


def _quantized(kind, in_f, out_f, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, quant_type=kind, compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=kind)
    if bias:
        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


class _Net(torch.nn.Module):
    def __init__(self, kind, in_f=64, mid=64, out_f=64):  # (bnb's 4-bit inference kernel: multiples of 64)
        super().__init__()
        self.a, self.b = _quantized(kind, in_f, mid), _quantized(kind, mid, out_f, seed=1, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _pair(kind, adapter_dtype=torch.float32, dropout=0.0, **shape):
    net = _Net(kind, **shape)
    setattr(net, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2, lora_dropout=dropout,
                             target_modules=["a", "b"])  # fmt: skip
    plain = peft.get_peft_model(net, cfg)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_E" in name:
                p.normal_()
    plain.to(adapter_dtype) if adapter_dtype != torch.float32 else None
    return plain, ak.accelerate_peft(copy.deepcopy(plain))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [{}, {"in_f": 123, "mid": 37, "out_f": 16}])
def test_accelerated_quantized_layers_compute_as_peft(kind, shape, caplog):
    with caplog.at_level("INFO", logger="adalora_kernels"):
        plain, fast = _pair(kind, **shape)
    assert "2 of 2 AdaLoRA layers fused" in caplog.text
    expected = "FusedSVDLinear8bitLt" if kind == "int8" else "FusedSVDLinear4bit"
    assert type(fast.base_model.model.a).__name__ == expected
    x = torch.randn(3, 5, shape.get("in_f", 64))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(v) for m, v in zip((plain, fast), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)
    theirs, ours = _grads(plain), _grads(fast)
    assert theirs.keys() == ours.keys() and len(ours) == 6
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


def test_bfloat16_adapters_over_a_quantized_base():
    plain, fast = _pair("nf4", adapter_dtype=torch.bfloat16)  # (PEFT's int8 layer fails with bf16 adapters)
    x = torch.randn(6, 64)
    ref = plain(x)
    torch.testing.assert_close(fast(x), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_training_run_with_the_allocator_gives_peft_s_rank_patterns(kind):
    plain, fast = _pair(kind)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, fast)]
    gen = torch.Generator().manual_seed(0)
    for step in range(15):
        x, target = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
        losses = []
        for model, opt in zip((plain, fast), opts):
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), step
        assert fast.peft_config["default"].rank_pattern == plain.peft_config["default"].rank_pattern, step


def test_save_load_disable_and_dropout(tmp_path):
    plain, fast = _pair("nf4", dropout=0.1)
    x = torch.randn(4, 64)
    fast.eval(), plain.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    with fast.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
    fast.train()
    y = fast(x)
    assert not torch.allclose(y, plain(x))  # dropout on (our mask)
    reloaded = []
    for model, folder in ((fast, tmp_path / "ours"), (plain, tmp_path / "peft")):
        model.save_pretrained(folder)
        net = _Net("nf4")
        net.is_loaded_in_4bit = True
        reloaded.append(peft.PeftModel.from_pretrained(net, folder).eval())
    # (a reloaded model runs bitsandbytes' inference kernel, a few 1e-3 off the training one: compare reloads)
    torch.testing.assert_close(reloaded[0](x), reloaded[1](x), rtol=0, atol=0)


def test_saved_for_backward_is_t_not_a_dropped_copy_of_x():
    from adalora_kernels.benchmarking import saved_bytes

    layer = torch.nn.Sequential(_quantized("nf4", 256, 256))
    layer.is_loaded_in_4bit = True
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=12, lora_dropout=0.1, target_modules=["0"])
    plain = peft.get_peft_model(layer, cfg)
    fast = ak.accelerate_peft(copy.deepcopy(plain))
    x = torch.randn(512, 256)
    _, peft_beyond = saved_bytes(plain, x)
    _, ours_beyond = saved_bytes(fast, x)
    assert ours_beyond * 10 <= peft_beyond, (ours_beyond, peft_beyond)


def test_a_plain_svdlinear_over_linear4bit_is_counted_as_peft_s_forward(caplog):
    net = _Net("nf4")  # a model not flagged as loaded in 4 bits: PEFT wraps its layers in a plain SVDLinear
    plain = peft.get_peft_model(net, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["a"]))
    why = r"a \(SVDLinear over Linear4bit: Linear4bit overrides nn\.Linear\.forward\)"
    with pytest.warns(UserWarning, match=why), caplog.at_level("INFO", logger="adalora_kernels"):
        fast = ak.accelerate_peft(copy.deepcopy(plain))
    assert "0 of 1 AdaLoRA layers fused" in caplog.text
    x = torch.randn(3, 64)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
    ours = _Net("nf4")  # our own layers wrap it around its own forward (tests/test_quantized_inject.py)
    ak.inject_adalora(ours, ["a"])
    assert isinstance(ours.a, ak.AdaLoRAQuantizedLinear) and ours.a.base_layer.__class__.__name__ == "Linear4bit"


# ------------------------------------------------------------------------------------------ the adapter-only op


@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b in ("torch", "triton_split")])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_the_adapter_op_matches_the_reference_and_opcheck(backend, p):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 33, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 7, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    P, Q = (
        torch.randn(17, 5, generator=gen, dtype=torch.float64),
        torch.randn(5, 33, generator=gen, dtype=torch.float64),
    )
    lam = torch.randn(5, generator=gen, dtype=torch.float64)
    leaves = [v.requires_grad_() for v in (P, lam, Q)]
    y = adalora_adapter(x, base, P, lam, Q, scaling=0.7, dropout_p=p, seed=11, backend=backend)
    keep = ak.kernels.get_backend(backend, x.device).dropout_keep_mask((14, 33), p, 11, x.device) if p else None
    ref = base + ak.reference.adalora_linear_ref(x, torch.zeros(17, 33, dtype=torch.float64), None, P, lam, Q, 0.7,
                                                 None, keep, p)  # fmt: skip
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, base, *leaves], g, retain_graph=True)
    want = torch.autograd.grad(ref, [x, base, *leaves], g, retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for wrt in ([x], leaves):  # dx alone (no adapter gradients), the adapter's alone
        mine = torch.autograd.grad(y, wrt, g, retain_graph=True)
        for a, b in zip(mine, torch.autograd.grad(ref, wrt, g, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    small = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
             for shape in ((2, 3, 5), (4, 2), (2,), (2, 5))]  # fmt: skip

    def small_adapter(x, P, lam, Q):
        return adalora_adapter(x, x[..., :4] * 0, P, lam, Q, scaling=0.7, dropout_p=p, seed=11, backend=backend)

    assert torch.autograd.gradgradcheck(small_adapter, small)  # backward(create_graph=True): differentiable grads
    from torch.func import grad  # torch.func: plain ATen ops, differentiated by the transform

    def adapter_loss(P, lam, Q):
        return adalora_adapter(x, base, P, lam, Q, scaling=0.7, dropout_p=p, seed=11, backend=backend).square().sum()

    by_func = grad(adapter_loss, argnums=(0, 1, 2))(*(v.detach() for v in leaves))
    for a, b in zip(by_func, torch.autograd.grad(adapter_loss(*leaves), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    seed = torch.tensor(11)
    x2 = x.detach().reshape(14, 33)
    torch.library.opcheck(adapter_fwd, (x2, P.detach(), lam.detach(), Q.detach(), p, seed, backend))
    t = x2 @ Q.detach().T
    torch.library.opcheck(adapter_bwd, (torch.randn(14, 17, dtype=torch.float64), x2, P.detach(), lam.detach(),
                                        Q.detach(), t, p, seed, backend, True, True))  # fmt: skip
