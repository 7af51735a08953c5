"""The ``adalora_kernels::linear_fwd`` / ``linear_bwd`` custom ops, their autograd, and ``adalora_linear``.

The ops take ``lam_eff = s · λ ⊙ m``, so their gradient with respect to it is ``Σ_rows (g P) ⊙ t`` and the
scale and rank mask are chained by ordinary autograd. Saved for backward: x, the parameters, t (M×r) and a
0-dim seed; the dropout mask is regenerated from the seed, never stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import get_backend, torch_composite
from ..reference import effective_lam
from .backend import measured_choice, requested, resolve_backend, runnable

_SEED_BOUND = 2**63


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _forward_impl(x, weight, bias, P, lam_eff, Q, dropout_p: float, seed: int, backend: str):
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # explicit rows: in_features may be 0
    kernels = get_backend(backend, x.device)
    y2, t = kernels.linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed)
    return y2.reshape(*x.shape[:-1], weight.shape[0]), t


def _backward_impl(grad, x, weight, P, lam_eff, Q, t, dropout_p, seed: int, backend, need_dx, need_adapter):
    rows = x.shape[:-1].numel()
    x2, g2 = x.reshape(rows, x.shape[-1]), grad.reshape(rows, weight.shape[0])
    kernels = get_backend(backend, x.device)
    dx, dP, dlam, dQ = kernels.linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter)
    return (dx.reshape(x.shape) if dx is not None else None), dP, dlam, dQ


def differentiable_backward(grad, x, weight, P, lam_eff, Q, dropout_p: float, seed: int, need_dx, need_adapter):
    """The gradients in differentiable torch ops, for a backward run with ``create_graph=True`` (gradient penalties,
    meta-learning): the torch backend's backward with t recomputed from x and Q, so autograd can differentiate the
    gradients again. The fused kernels' results carry no autograd history: a second derivative through them would
    be silently zero or partial. ``weight=None``: the adapter alone (``adalora_adapter``)."""
    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, x.shape[-1])
    g2 = grad.reshape(rows, P.shape[0])
    t = torch_composite.adapter_t(x2, Q, dropout_p, seed)
    if weight is None:
        grads = torch_composite.adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter)
    else:
        grads = torch_composite.linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx,
                                                need_adapter)  # fmt: skip
    dx, dP, dlam, dQ = grads
    return (dx.reshape(x.shape) if dx is not None else None), dP, dlam, dQ


@torch.library.custom_op("adalora_kernels::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam_eff: Tensor,
    Q: Tensor,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, weight, bias, P, lam_eff, Q, dropout_p, int(seed), backend)


@linear_fwd.register_fake
def _(x, weight, bias, P, lam_eff, Q, dropout_p, seed, backend):
    rows = x.shape[:-1].numel()
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, Q.shape[0])


@torch.library.custom_op("adalora_kernels::linear_bwd", mutates_args=())
def linear_bwd(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    P: Tensor,
    lam_eff: Tensor,
    Q: Tensor,
    t: Tensor,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    need_dx: bool,
    need_adapter: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_impl(grad, x, weight, P, lam_eff, Q, t, dropout_p, int(seed), backend, need_dx, need_adapter)
    return tuple(v if v is not None else _empty(x) for v in grads)


@linear_bwd.register_fake
def _(grad, x, weight, P, lam_eff, Q, t, dropout_p, seed, backend, need_dx, need_adapter):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else _empty(x)
    if not need_adapter:
        return dx, _empty(x), _empty(x), _empty(x)
    return dx, torch.empty_like(P), torch.empty_like(lam_eff), torch.empty_like(Q)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, P, lam_eff, Q, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, P, lam_eff, Q, output[1], seed)
    ctx.dropout_p, ctx.backend, ctx.eager = dropout_p, backend, False


def _backward(ctx, grad_y, _grad_t=None):
    x, weight, P, lam_eff, Q, t, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_adapter = need[0], need[3] or need[4] or need[5]
    dx = dW = db = dP = dlam = dQ = None
    if need_dx or need_adapter:
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients autograd can differentiate again
            grads = differentiable_backward(grad_y, x, weight, P, lam_eff, Q, ctx.dropout_p, int(seed), need_dx,
                                            need_adapter)  # fmt: skip
        elif ctx.eager:  # the kernels directly, no custom-op dispatch (see _EagerLinear)
            grads = _backward_impl(grad_y, x, weight, P, lam_eff, Q, t, ctx.dropout_p, ctx.seed, ctx.backend,
                                   need_dx, need_adapter)  # fmt: skip
        else:
            grads = linear_bwd(
                grad_y, x, weight, P, lam_eff, Q, t, ctx.dropout_p, seed, ctx.backend, need_dx, need_adapter
            )
        dx, dP, dlam, dQ = grads
        dx = dx if need_dx else None
        dP, dlam, dQ = (v if n else None for v, n in zip((dP, dlam, dQ), need[3:6]))
    rows = x.shape[:-1].numel()
    if need[1]:  # a base weight the user chose to train: a plain GEMM, outside the fused kernels
        dW = grad_y.reshape(rows, weight.shape[0]).T @ x.reshape(rows, x.shape[-1])
    if need[2]:
        db = grad_y.reshape(rows, weight.shape[0]).sum(0)
    return dx, dW, db, dP, dlam, dQ, None, None, None


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinear(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: ``torch.autograd.Function`` straight to
    the kernels skips the custom-op dispatch layers (about 0.1 ms of host time per fwd+bwd). Traced calls
    (torch.compile) and fake tensors take the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, P, lam_eff, Q, dropout_p, seed_t, backend):
        seed = int(seed_t)
        y, t = _forward_impl(x, weight, bias, P, lam_eff, Q, dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, P, lam_eff, Q, t, seed_t)
        ctx.dropout_p, ctx.backend, ctx.eager, ctx.seed = dropout_p, backend, True, seed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)


class _PeftOrderLinear(torch.autograd.Function):
    """The forward rounded as PEFT's ``SVDLinear`` (no dropout): the base output first, then
    ``((x @ (Q * λ)ᵀ) @ Pᵀ) * scaling / (ranknum + 1e-5)`` added, through the same ATen calls in the same order, so
    the output is PEFT's to the last bit wherever PEFT's own calls give the same bits; ``t = x Qᵀ`` is computed
    beside it for the backward, which is the backend's fused one (as ``_EagerLinear``'s)."""

    @staticmethod
    def forward(ctx, x, weight, bias, P, lam_eff, Q, lam, scaling, ranknum, backend):
        x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])
        y = torch.nn.functional.linear(x2, weight, bias)
        y += (x2 @ (Q * lam.view(-1, 1)).T @ P.T) * scaling / (ranknum + 1e-5)
        t = x2 @ Q.T
        seed = torch.zeros((), dtype=torch.int64)
        ctx.save_for_backward(x, weight, P, lam_eff, Q, t, seed)
        ctx.dropout_p, ctx.backend, ctx.eager, ctx.seed = 0.0, backend, True, 0
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        return (*_backward(ctx, grad_y)[:6], None, None, None, None)


def adalora_linear_peft_order(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    *,
    scaling: float,
    ranknum: Tensor,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """``adalora_linear`` without dropout, its forward rounded as PEFT's ``SVDLinear`` (``lam``: PEFT's ``lora_E``
    as an (r,) vector, ``scaling`` and ``ranknum`` PEFT's own): the output equals PEFT's bit for bit where PEFT's
    GEMMs run the same way, the gradients are the fused backward's (fp32 rounding of PEFT's). Its forward costs
    PEFT's rank-r GEMMs and one more (t = x Qᵀ, kept for the backward); ``adalora_linear`` is the fast rounding.
    ``scale``: ``scaling / (ranknum + 1e-5)`` where the caller knows it (saves reading ranknum from the device).
    Under ``torch.compile`` it is ``adalora_linear``."""
    _check_tensor_args(x=x, weight=weight, bias=bias, P=P, lam=lam, Q=Q, ranknum=ranknum)
    if scale is None:
        scale = float(scaling) / (float(ranknum.reshape(-1)[0]) + 1e-5)
    if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
        return adalora_linear(x, weight, bias, P, lam, Q, scaling=scale, backend=backend)
    _check_inputs(x, weight, bias, P, lam, Q, None, 0.0, scale)
    name = resolve_backend(backend, x.device)
    lam_eff = effective_lam(lam, None, scale)
    return _PeftOrderLinear.apply(x, weight, bias, P, lam_eff, Q, lam.detach(), float(scaling), ranknum, name)


def _check_tensor_args(**tensors) -> None:
    """Every tensor argument is a tensor (bias and rank_mask may be None), before anything reads them."""
    for name, value in tensors.items():
        optional = name in ("bias", "rank_mask")
        if not isinstance(value, Tensor) and not (optional and value is None):
            what = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")


def _inputs_are_valid(x, weight, bias, P, lam, Q, rank_mask, dropout_p, scaling) -> bool:
    """The common case of ``_check_inputs`` in a few comparisons (it runs on every layer call); ``False``
    sends the call through the checks that name what is wrong."""
    if weight.dim() != 2 or lam.dim() != 1 or x.dim() < 1 or type(scaling) is not float:
        return False
    out_f, in_f = weight.shape
    r = lam.shape[0]
    dtype, device = x.dtype, x.device
    return (
        x.shape[-1] == in_f and P.shape == (out_f, r) and Q.shape == (r, in_f) and x.is_floating_point()
        and weight.dtype == dtype and P.dtype == dtype and lam.dtype == dtype and Q.dtype == dtype
        and weight.device == device and P.device == device and lam.device == device and Q.device == device
        and (bias is None or (bias.shape == (out_f,) and bias.dtype == dtype and bias.device == device))
        and (rank_mask is None
             or (rank_mask.shape == (r,) and rank_mask.dtype == torch.bool and rank_mask.device == device))
        and isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0 and abs(scaling) < math.inf
    )  # fmt: skip


def _check_inputs(x, weight, bias, P, lam, Q, rank_mask, dropout_p, scaling) -> None:
    if _inputs_are_valid(x, weight, bias, P, lam, Q, rank_mask, dropout_p, scaling):
        return
    tensors = {"x": x, "weight": weight, "bias": bias, "P": P, "lam": lam, "Q": Q, "rank_mask": rank_mask}
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension in_features={in_f} (from weight), got shape {tuple(x.shape)}")
    if lam.dim() != 1:
        raise ValueError(
            f"lam: expected a 1-D (r,) tensor, got shape {tuple(lam.shape)} (PEFT's lora_E: use .view(-1))"
        )
    r = lam.shape[0]
    expected = {"bias": (out_f,), "P": (out_f, r), "Q": (r, in_f), "rank_mask": (r,)}
    for name, shape in expected.items():
        value = tensors[name]
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {shape} (out_features={out_f}, r={r} from lam, in_features={in_f}), "
                f"got {tuple(value.shape)}"
            )
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    for name, value in tensors.items():
        if value is None or name == "x":
            continue
        if value.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {value.device}")
        if name == "rank_mask":
            if value.dtype != torch.bool:
                raise TypeError(f"rank_mask: expected a torch.bool tensor, got {value.dtype}")
        elif value.dtype != x.dtype:
            raise TypeError(
                f"{name}: expected dtype {x.dtype} (the dtype of x), got {value.dtype}; "
                "adalora_linear does not cast, convert the inputs or the layer first"
            )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
    if isinstance(scaling, (int, float)) and not abs(scaling) < math.inf:  # NaN too; plain compares trace
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def auto_key(x: Tensor, weight: Tensor, bias: Tensor | None, lam: Tensor, dropout_p: float) -> tuple:
    """What auto's measured choice depends on: the device, the token count's power-of-two bucket, the
    layer's shape, rank, dtype, and whether dropout and a bias are on."""
    rows = x.numel() // max(x.shape[-1], 1)
    bucket = 1 << max(rows - 1, 0).bit_length()
    out_f, in_f = weight.shape
    return (str(x.device), bucket, in_f, out_f, lam.shape[0], str(x.dtype).removeprefix("torch."), dropout_p > 0.0,
            bias is not None)  # fmt: skip


def time_backend_ms(name: str, key: tuple, device: torch.device, reps: int = 5) -> float:
    """Median CUDA-event milliseconds of one forward + backward of backend ``name`` on fresh inputs shaped as
    ``key`` says (after two warm-up calls, which also autotune the Triton kernels)."""
    _, rows, in_f, out_f, r, dtype_name, dropout, has_bias = key
    dtype = getattr(torch, dtype_name)
    kernels = get_backend(name, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x, g = (torch.randn(rows, n, device=device, dtype=dtype, generator=gen) for n in (in_f, out_f))
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) / in_f**0.5
    bias = torch.zeros(out_f, device=device, dtype=dtype) if has_bias else None
    P, Q = (torch.randn(*shape, device=device, dtype=dtype, generator=gen) for shape in ((out_f, r), (r, in_f)))
    lam = torch.randn(r, device=device, dtype=dtype, generator=gen)
    p = 0.1 if dropout else 0.0

    def step():
        _, t = kernels.linear_forward(x, weight, bias, P, lam, Q, p, 1234)
        kernels.linear_backward(g, x, weight, P, lam, Q, t, p, 1234, True, True)

    with torch.no_grad():
        step(), step()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _shape_reason(name: str, device: torch.device, r: int) -> str | None:
    """Why backend ``name`` cannot run rank ``r`` on ``device`` (a backend's own ``shape_reason``), or ``None``:
    auto never times a backend on a shape its checks would reject."""
    check = getattr(get_backend(name, device), "shape_reason", None)
    return check(device, r) if check is not None else None


def adapter_by_aten(x: Tensor, P: Tensor, lam_eff: Tensor, Q: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``((drop(x) Qᵀ) ⊙ λeff) Pᵀ`` of shape ``(..., out)`` in plain ATen ops: what runs under ``torch.func``
    transforms (grad, vmap for per-sample gradients, jacrev), which differentiate it themselves; the fused ops'
    autograd.Function has no vmap rules, and C++ autograd cannot run under a transform at all."""
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    t = torch_composite.adapter_t(x2, Q, dropout_p, seed)
    return ((t * lam_eff) @ P.T).reshape(*x.shape[:-1], P.shape[0])


def _seed_tensor(seed: int | Tensor | None) -> Tensor:
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(
                f"seed: expected an int or a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}"
            )
        seed = seed.reshape(()).cpu()
        if int(seed) < 0:  # (every backend reads a negative seed as "draw one")
            raise ValueError(f"seed: expected a value in [0, 2**63), got {int(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


def adalora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    *,
    scaling: float,
    rank_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y = x Wᵀ + b + s · ((drop(x) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ`` with the adapter fused into the base layer.

    Shapes: x ``(..., in)``, weight ``(out, in)``, P ``(out, r)``, lam ``(r,)``, Q ``(r, in)``,
    all of one dtype and device (nothing is cast, except to the autocast dtype inside ``torch.autocast``, as
    ``F.linear``). Dropout (training only) is inverted dropout on the adapter
    input, its mask drawn from ``seed`` (from torch's generator when ``None``) and regenerated in backward.
    ``backend``: ``None``/``"auto"``, ``"torch"``, ``"triton"`` or ``"csrc"``.
    """
    _check_tensor_args(x=x, weight=weight, bias=bias, P=P, lam=lam, Q=Q, rank_mask=rank_mask)
    device_type = x.device.type  # cpu and cuda always have autocast; torch 2.11's dynamo cannot trace the check
    if (device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)) and torch.is_autocast_enabled(
        device_type
    ):
        # as autocast does for F.linear: compute in the autocast dtype, grads flow back through the casts
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, P, lam, Q = (t.to(dtype) for t in (x, weight, P, lam, Q))
        bias = bias.to(dtype) if bias is not None else None
    _check_inputs(x, weight, bias, P, lam, Q, rank_mask, dropout_p, scaling)
    p = float(dropout_p) if training else 0.0
    eager = x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()
    if eager and p > 0.0 and seed is None and _capturing(x.device):
        raise RuntimeError(
            "dropout_p > 0 with seed=None under CUDA graph capture: the seed is drawn on the host once, so every "
            "replay would reuse one dropout mask; pass seed= (a fixed mask is then what you asked for), or use "
            "lora_dropout=0 for the captured part"
        )
    name = resolve_backend(backend, x.device)
    if eager and torch._C._are_functorch_transforms_active():  # torch.func: grad, vmap, jacrev
        seed_i = int(_seed_tensor(seed)) if p > 0.0 else 0
        lam_eff = effective_lam(lam, rank_mask, float(scaling))
        return torch.nn.functional.linear(x, weight, bias) + adapter_by_aten(x, P, lam_eff, Q, p, seed_i)
    if eager and x.device.type == "cuda" and requested(backend) == "auto":
        candidates = [b for b in runnable(x.device) if _shape_reason(b, x.device, lam.shape[0]) is None]
        if len(candidates) > 1:
            key = auto_key(x, weight, bias, lam, p)
            name = measured_choice(key, candidates, lambda b: time_backend_ms(b, key, x.device))
        elif candidates:
            name = candidates[0]
    kernels = get_backend(name, x.device) if eager else None
    if eager and hasattr(kernels, "layer_call"):  # the whole call and its autograd in one native op
        seed_i = int(_seed_tensor(seed)) if seed is not None else (-1 if p > 0.0 else 0)
        return kernels.layer_call(x, weight, bias, P, lam, Q, rank_mask, float(scaling), p, seed_i)
    seed_t = _seed_tensor(seed) if (p > 0.0 or seed is not None) else torch.zeros((), dtype=torch.int64)
    lam_eff = effective_lam(lam, rank_mask, float(scaling))
    if eager:
        return _EagerLinear.apply(x, weight, bias, P, lam_eff, Q, p, seed_t, name)
    return linear_fwd(x, weight, bias, P, lam_eff, Q, p, seed_t, name)[0]
