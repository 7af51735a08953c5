"""Plain-PyTorch reference of the AdaLoRA layer (DESIGN §1): readable, any dtype, the oracle of the tests.

    y = x Wᵀ + b + s · ((drop(x) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ

``keep`` is the dropout keep-mask over the flattened ``(M, in)`` input (1 = kept); ``None`` means no dropout.
``dropout_keep_mask`` is the mask of DESIGN §4 that every backend draws for a seed (written here from the
definition, with integer arithmetic that cannot overflow), so a run can change backend and each backend's
mask is checked against this one.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_U32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)  # the Weyl increments of its key
PHILOX_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # a word w maps to u = float32(v) * this in float32, v = w or ~w below 2³¹


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a · b`` (a < 2³², b int64 holding values < 2³²), in 16-bit halves of a so
    that no int64 product overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = b * a_hi, b * a_lo  # each < 2⁴⁸
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _U32


def philox4x32(
    seed: int, c0: Tensor, c1: Tensor, c2: Tensor | None = None, c3: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) of the counter ``(c0, c1, c2, c3)`` (c2, c3 zero unless given) under
    the key ``(seed mod 2³², seed >> 32)``: four int64 tensors of 32-bit words (the counters: int64 tensors of
    values below 2³², broadcast together)."""
    zero = torch.zeros((), dtype=torch.int64, device=c0.device)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, zero if c2 is None else c2, zero if c3 is None else c3)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_STEP[0]) & _U32
        k1 = (k1 + _PHILOX_KEY_STEP[1]) & _U32
    return c0, c1, c2, c3


@functools.lru_cache(maxsize=64)
def dropout_threshold(dropout_p: float) -> int:
    """The least ``v`` in [0, 2³¹] whose uniform ``float32(float32(v) · scale)`` is ``>= float32(p)``: a word is
    kept when its ``v`` reaches it (the uniform is non-decreasing in v, so the compare is one integer compare);
    0 keeps every word, 2³¹ none."""
    p32 = torch.tensor(dropout_p, dtype=torch.float32)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)

    def kept(v: int) -> bool:
        return bool(torch.tensor(v, dtype=torch.int64).to(torch.float32) * scale >= p32)

    lo, hi = 0, 1 << 31  # kept(hi) is taken as true: the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device=None) -> Tensor:
    """DESIGN §4's mask of an ``(M, in)`` input: element (row, col) is kept when word ``col % 4`` of
    ``philox4x32(seed, col // 4, row)``, as a uniform in [0, 1), is ``>= p`` (p in float32)."""
    rows, cols = shape
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    groups = (cols + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    c1 = (torch.arange(rows, dtype=torch.int64, device=device) & _U32)[:, None]
    words = torch.stack(philox4x32(seed, c0, c1), dim=-1).reshape(rows, groups * 4)[:, :cols]
    v = torch.where(words >= 1 << 31, words ^ _U32, words)  # as int32: ~w where negative
    return v >= dropout_threshold(dropout_p)


def peft_scaling(init_r: int, lora_alpha: float) -> float:
    """PEFT's effective adapter scale ``s = scaling / (ranknum + 1e-5)``, ``scaling = alpha or r``."""
    scaling = lora_alpha if lora_alpha > 0 else float(init_r)
    return scaling / (init_r + 1e-5)


def effective_lam(lam: Tensor, rank_mask: Tensor | None, scaling: float) -> Tensor:
    """``s · λ ⊙ m`` as an r-vector."""
    lam = lam * scaling
    return lam if rank_mask is None else lam * rank_mask.to(lam.dtype)


def _dropped(x2: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    return x2 if keep is None else x2 * keep.to(x2.dtype) / (1.0 - dropout_p)


def _upcast(tensors, upcast: bool):
    return [t.double() if (upcast and t is not None and t.is_floating_point()) else t for t in tensors]


def adalora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    scaling: float,
    rank_mask: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> Tensor:
    """Forward of DESIGN §1, differentiable by autograd; ``upcast=True`` computes in fp64."""
    x, weight, bias, P, lam, Q = _upcast([x, weight, bias, P, lam, Q], upcast)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.T
    if bias is not None:
        y = y + bias
    t = _dropped(x2, keep, dropout_p) @ Q.T
    y = y + (t * effective_lam(lam, rank_mask, scaling)) @ P.T
    return y.reshape(*x.shape[:-1], weight.shape[0])


def adalora_linear_backward_ref(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    scaling: float,
    rank_mask: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The closed-form backward of DESIGN §1: ``(dx, dP, dlam, dQ)``, with W frozen."""
    grad, x, weight, P, lam, Q = _upcast([grad, x, weight, P, lam, Q], upcast)
    x2 = x.reshape(-1, x.shape[-1])
    g = grad.reshape(-1, weight.shape[0])
    lam_eff = effective_lam(lam, rank_mask, scaling)
    xd = _dropped(x2, keep, dropout_p)
    t = xd @ Q.T
    dt = g @ P
    dx = g @ weight + _dropped(dt * lam_eff @ Q, keep, dropout_p)
    dP = g.T @ (t * lam_eff)
    m = torch.ones_like(lam) if rank_mask is None else rank_mask.to(lam.dtype)
    dlam = scaling * m * (dt * t).sum(0)
    dQ = (dt * lam_eff).T @ xd
    return dx.reshape(x.shape), dP, dlam, dQ
