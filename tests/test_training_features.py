"""Training features around the layer: autocast, activation checkpointing, torch.compile of a whole model."""

import pytest
import torch
from helpers import DEVICE, runnable_backends
from torch import nn
from torch.utils.checkpoint import checkpoint

import adalora_kernels as ak


class Block(nn.Module):
    """A small pre-norm MLP block with two adapted projections."""

    def __init__(self, dim=32, hidden=64, dropout=0.2, backend=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = ak.AdaLoRALinear(dim, hidden, init_r=4, lora_dropout=dropout, backend=backend)
        self.down = ak.AdaLoRALinear(hidden, dim, init_r=4, lora_dropout=dropout, backend=backend)
        for layer in (self.up, self.down):
            nn.init.normal_(layer.lam)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", runnable_backends())
def test_autocast_cpu_bf16(backend):
    if backend.startswith("triton") and DEVICE.type != "cuda":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 is in the GPU tier")
    torch.manual_seed(0)
    model = Block(dropout=0.0, backend=backend).to(DEVICE)
    x = torch.randn(4, 8, 32, device=DEVICE)
    ref = model(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model(x)
        assert model.up(x).dtype == torch.bfloat16  # the layer computes in the autocast dtype
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)  # fp32 params
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert model.up.lam.grad is not None and torch.isfinite(model.up.lam.grad).all()


@pytest.mark.parametrize("backend", runnable_backends())
def test_activation_checkpointing_reproduces_the_dropout_mask(backend):
    torch.manual_seed(0)
    model = Block(backend=backend).to(DEVICE).train()
    x = torch.randn(4, 8, 32, device=DEVICE, requires_grad=True)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(123)  # the seed of each layer's dropout is drawn from torch's generator
        out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        out.square().mean().backward()
        grads.append((adapter_grads(model), x.grad.clone()))
        model.zero_grad(), x.grad.zero_()
    (g0, gx0), (g1, gx1) = grads
    torch.testing.assert_close(gx1, gx0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


def test_transformers_gradient_checkpointing_matches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ak.inject_adalora(model, ["q_proj", "v_proj", "down_proj"], init_r=4, lora_dropout=0.3)
    for m in model.modules():
        if isinstance(m, ak.AdaLoRALinear):
            nn.init.normal_(m.lam)
    model.train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for enable in (False, True):
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(adapter_grads(model))
        model.zero_grad()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_compile_whole_model_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Block(dropout=0.0, backend="torch"), Block(dropout=0.0, backend="torch")).to(DEVICE)
    x = torch.randn(3, 5, 32, device=DEVICE)
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager = adapter_grads(model)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, g in adapter_grads(model).items():
        torch.testing.assert_close(g, eager[name], rtol=1e-4, atol=1e-5, msg=name)
