"""The ``adalora_linear`` op on every backend that runs here, against the fp64 reference."""

import warnings

import pytest
import torch
from helpers import DEVICE, keep_mask, make_inputs, max_err, runnable_backends

import adalora_kernels as ak
from adalora_kernels.ops import linear_bwd, linear_fwd
from adalora_kernels.reference import adalora_linear_backward_ref, adalora_linear_ref

BACKENDS = runnable_backends()
SHAPES = [  # (leading dims, in, out, r): odd sizes beside round ones
    ((1,), 16, 16, 1),
    ((37,), 123, 431, 3),
    ((2, 5), 64, 48, 16),
    ((3, 1, 7), 33, 17, 12),
    ((300,), 40, 56, 5),  # more rows than features (csrc folds the adapter into W), several row blocks
]
S = 8 / (12 + 1e-5)


def run(backend, x, w, b, P, lam, Q, m, p=0.0, seed=None):
    return ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, rank_mask=m, dropout_p=p, seed=seed, backend=backend)


def check_against_reference(backend, dtype, lead, in_f, out_f, r, *, bias=True, mask=False, p=0.0, seed=123):
    x, w, b, P, lam, Q, m = make_inputs(lead, in_f, out_f, r, dtype, bias=bias, mask=mask)
    keep = keep_mask(backend, (x.numel() // in_f, in_f), p, seed) if p > 0 else None
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = run(backend, x, w, b, P, lam, Q, m, p, seed)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, leaves, g)
    ref_y = adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, p, upcast=True)
    ref_dx, ref_dP, ref_dlam, ref_dQ = adalora_linear_backward_ref(g, x, w, P, lam, Q, S, m, keep, p, upcast=True)
    refs = [ref_y, ref_dx, ref_dP, ref_dlam, ref_dQ]
    outs = [y, *grads]
    if dtype in (torch.float16, torch.bfloat16):
        # error bound: 2x what plain PyTorch in the same dtype makes against fp64, plus a small atol
        with torch.no_grad():
            plain = [v.detach() for v in (x, P, lam, Q)]
        plain = [v.requires_grad_() for v in plain]
        py = adalora_linear_ref(plain[0], w, b, plain[1], plain[2], plain[3], S, m, keep, p)
        plain_outs = [py, *torch.autograd.grad(py, plain, g)]
        for name, o, ref, po in zip(["y", "dx", "dP", "dlam", "dQ"], outs, refs, plain_outs):
            bound = 2 * max_err(po, ref) + 1e-3 * max(ref.abs().max().item(), 1.0)
            assert max_err(o, ref) <= bound, f"{name}: {max_err(o, ref)} > {bound}"
    else:
        rel = 1e-10 if dtype == torch.float64 else 1e-5
        for name, o, ref in zip(["y", "dx", "dP", "dlam", "dQ"], outs, refs):
            scale = max(ref.abs().max().item(), 1e-3) if ref.numel() else 1.0
            assert max_err(o, ref) <= rel * scale, f"{name}: {max_err(o, ref)} > {rel} * {scale}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
def test_matches_reference(backend, dtype, lead, in_f, out_f, r):
    check_against_reference(backend, dtype, lead, in_f, out_f, r, mask=r > 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bias,mask,p", [(False, True, 0.0), (True, False, 0.25), (False, True, 0.1)])
def test_bias_mask_dropout(backend, dtype, bias, mask, p):
    check_against_reference(backend, dtype, (3, 11), 40, 24, 5, bias=bias, mask=mask, p=p)


# the Triton interpreter's bf16 dot is wrong (and refused): Triton's bf16 runs in the GPU tier
@pytest.mark.parametrize("backend", [b for b in BACKENDS if DEVICE.type == "cuda" or not b.startswith("triton")])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bfloat16(backend, p):
    check_against_reference(backend, torch.bfloat16, (70,), 40, 56, 5, mask=True, p=p)


# ranks above the Triton routes' limits (fused 128, split 64): the csrc kernels (CPU and CUDA) and torch have none
@pytest.mark.parametrize("backend", [b for b in BACKENDS if not b.startswith("triton")])
@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.2), (torch.bfloat16, 0.0)])
def test_ranks_above_the_triton_limits(backend, dtype, p):
    check_against_reference(backend, dtype, (70,), 48, 40, 160, mask=True, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_zero_is_the_base_layer(backend):
    x, w, b, P, lam, Q, _ = make_inputs((9,), 20, 12, 0, torch.float64)
    y = run(backend, x, w, b, P, lam, Q, None, 0.2, 5)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, w, b, P, lam, Q, m = make_inputs((6, 10), 32, 16, 4, torch.float64, mask=True)
    xt = x.transpose(0, 1)  # (10, 6, 32), not contiguous
    assert not xt.is_contiguous()
    y = run(backend, xt, w, b, P, lam, Q, m)
    torch.testing.assert_close(y, run(backend, xt.contiguous(), w, b, P, lam, Q, m))
    torch.testing.assert_close(y, adalora_linear_ref(xt, w, b, P, lam, Q, S, m))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_non_contiguous_parameters(backend, p):
    """weight, P and Q as transposed views (as PEFT's fan_in_fan_out layers hand them over): same as contiguous."""
    x, w, b, P, lam, Q, m = make_inputs((70,), 40, 24, 5, torch.float32, mask=True)
    views = [v.T.contiguous().T for v in (w, P, Q)]
    assert not any(v.is_contiguous() for v in views)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    view_leaves = [v.requires_grad_() for v in views[1:]]
    g = torch.randn(70, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = run(backend, x, w, b, P, lam, Q, m, p, seed=3)
    yv = run(backend, x, views[0], b, *view_leaves[:1], lam, view_leaves[1], m, p, seed=3)
    torch.testing.assert_close(yv, y)
    grads = torch.autograd.grad(y, [leaves[0], leaves[1], leaves[3]], g)
    torch.testing.assert_close(torch.autograd.grad(yv, [leaves[0], *view_leaves], g), grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64(backend, p):
    x, w, b, P, lam, Q, m = make_inputs((2, 3), 9, 7, 3, torch.float64, mask=True)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]

    def f(x, P, lam, Q):  # fixed seed: backward must regenerate the forward's mask
        return run(backend, x, w, b, P, lam, Q, m, p, seed=42)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_second_derivatives_fp64(backend, p):
    """backward(create_graph=True) (gradient penalties, meta-learning) gives gradients autograd can differentiate
    again, every input included: the fused kernels' results carry no history, so a backend that returned them
    there gave a second derivative of zero (csrc) or a partial one (the triton routes, the torch backend's saved t)."""
    x, w, b, P, lam, Q, m = make_inputs((2, 2), 5, 4, 3, torch.float64, mask=True)
    leaves = [v.requires_grad_() for v in (x, w, b, P, lam, Q)]

    def f(x, w, b, P, lam, Q):
        return run(backend, x, w, b, P, lam, Q, m, p, seed=42)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it backpropagates through an op with no autograd kernel
        assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_func_grad_and_per_sample_vmap(backend, p):
    """Under torch.func transforms (grad, vmap: per-sample gradients) the layer runs as ATen ops the transform
    differentiates; autograd.Function without vmap rules, and C++ autograd, cannot run there."""
    from torch.func import functional_call, grad, vmap

    layer = ak.AdaLoRALinear(9, 7, init_r=3, lora_dropout=p, backend=backend)
    layer.seed = 5
    with torch.no_grad():
        layer.lam.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}

    def loss(params, x):
        return functional_call(layer, params, (x,)).square().sum()

    def eager_grads(x):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x).backward()
        return {k: v.grad for k, v in layer.named_parameters() if v.requires_grad}

    for k, g in grad(loss)(params, x).items():
        torch.testing.assert_close(g, eager_grads(x)[k])
    if p == 0.0:  # (dropout under vmap needs torch.func's randomness= flag; its rows would be each sample's own)
        per_sample = vmap(grad(lambda params, xi: loss(params, xi[None])), in_dims=(None, 0))(params, x)
        for i in range(len(x)):
            for k, g in eager_grads(x[i : i + 1]).items():
                torch.testing.assert_close(per_sample[k][i], g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_determinism(backend):
    x, w, b, P, lam, Q, _ = make_inputs((16,), 32, 8, 4, torch.float32)
    a = run(backend, x, w, b, P, lam, Q, None, 0.5, seed=7)
    assert torch.equal(a, run(backend, x, w, b, P, lam, Q, None, 0.5, seed=7))
    assert not torch.equal(a, run(backend, x, w, b, P, lam, Q, None, 0.5, seed=8))
    torch.manual_seed(3)
    c = run(backend, x, w, b, P, lam, Q, None, 0.5)
    torch.manual_seed(3)
    assert torch.equal(c, run(backend, x, w, b, P, lam, Q, None, 0.5))  # seed drawn from torch's generator


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_rate_and_eval_mode(backend):
    keep = keep_mask(backend, (64, 256), 0.3, 11)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.02
    x, w, b, P, lam, Q, _ = make_inputs((8,), 16, 8, 2, torch.float64)
    no_drop = run(backend, x, w, b, P, lam, Q, None)
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=S, dropout_p=0.5, training=False, backend=backend)
    torch.testing.assert_close(y, no_drop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_bound(backend, p):
    """Beyond x and the parameters, backward keeps at most M·r elements plus O(r)."""
    lead, in_f, out_f, r = (4, 64), 96, 80, 8
    x, w, b, P, lam, Q, m = make_inputs(lead, in_f, out_f, r, torch.float32, mask=True)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    known = {v.data_ptr() for v in (x, w, b, *leaves)}
    extra = []

    def pack(t):
        if t.data_ptr() not in known:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(backend, x, w, b, P, lam, Q, m, p, seed=1)
    rows = 4 * 64
    assert sum(extra) <= rows * r * x.element_size() + 64 * r + 64, extra


def test_opcheck():
    x, w, b, P, lam, Q, _ = make_inputs((5,), 12, 10, 3, torch.float64)
    seed = torch.tensor(9, dtype=torch.int64)
    for backend in BACKENDS:
        for p in (0.0, 0.2):
            for args in ((x, w, b, P, lam, Q, p, seed, backend), (x, w, None, P, lam, Q, p, seed, backend)):
                args = (args[0].clone().requires_grad_(), *args[1:])
                torch.library.opcheck(linear_fwd, args)
            y, t = linear_fwd(x, w, b, P, lam, Q, p, seed, backend)
            g = torch.randn_like(y)
            for need in ((True, True), (True, False), (False, True)):
                torch.library.opcheck(linear_bwd, (g, x, w, P, lam, Q, t, p, seed, backend, *need))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = ak.AdaLoRALinear(24, 16, init_r=4, backend=backend, device=DEVICE, dtype=torch.float32)
    torch.nn.init.normal_(layer.lam)
    x = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    y_eager = layer(x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    y_comp = compiled(x)
    (gx_comp,) = torch.autograd.grad(y_comp.square().sum(), x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_comp, gx_eager, rtol=1e-5, atol=1e-5)


def test_trainable_bias_and_weight_get_gradients():
    x, w, b, P, lam, Q, m = make_inputs((7,), 10, 6, 2, torch.float64)
    leaves = [v.requires_grad_() for v in (x, w, b, P, lam, Q)]
    y = run("torch", x, w, b, P, lam, Q, m)
    ref = adalora_linear_ref(x, w, b, P, lam, Q, S, m)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_each_gradient_asked_for_alone_matches_the_reference(backend, bias):
    """Trainable base weight and bias beside the adapter, each gradient asked for on its own (the native op
    finds its inputs' slots with and without a bias), against the reference's autograd."""
    x, w, b, P, lam, Q, m = make_inputs((3, 4), 10, 6, 3, torch.float64, bias=bias, mask=True)
    leaves = [v.requires_grad_() for v in (x, w, b, P, lam, Q) if v is not None]
    g = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    y = run(backend, x, w, b, P, lam, Q, m, 0.2, seed=5)
    keep = keep_mask(backend, (12, 10), 0.2, 5)
    ref = adalora_linear_ref(x, w, b, P, lam, Q, S, m, keep, 0.2)
    torch.testing.assert_close(y, ref)
    for leaf in leaves:
        (got,) = torch.autograd.grad(y, leaf, g, retain_graph=True)
        (want,) = torch.autograd.grad(ref, leaf, g, retain_graph=True)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_and_no_grad_give_the_training_forward(backend):
    x, w, b, P, lam, Q, m = make_inputs((5,), 12, 7, 4, torch.float64, mask=True)
    y = run(backend, x, w, b, P, lam, Q, m, 0.3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(run(backend, x, w, b, P, lam, Q, m, 0.3, seed=4), y)
    with torch.inference_mode():
        torch.testing.assert_close(run(backend, x, w, b, P, lam, Q, m, 0.3, seed=4), y)
