"""Bad input to ``adalora_linear`` gets an error naming the argument and what was expected."""

import pytest
import torch
from helpers import make_inputs

import adalora_kernels as ak


def call(**over):
    x, w, b, P, lam, Q, m = make_inputs((3,), 8, 6, 2, torch.float32, mask=True, device="cpu")
    args = {"x": x, "weight": w, "bias": b, "P": P, "lam": lam, "Q": Q, "rank_mask": m}
    args.update(over)
    kw = {k: args.pop(k) for k in list(args) if k not in ("x", "weight", "bias", "P", "lam", "Q")}
    kw.setdefault("scaling", 1.0)
    return ak.adalora_linear(*args.values(), **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"x": torch.randn(3, 9)}, ValueError, r"x: expected last dimension in_features=8"),
        ({"weight": torch.randn(6, 8, 1)}, ValueError, r"weight: expected a 2-D"),
        ({"P": torch.randn(6, 3)}, ValueError, r"P: expected shape \(6, 2\)"),
        ({"Q": torch.randn(2, 7)}, ValueError, r"Q: expected shape \(2, 8\)"),
        ({"lam": torch.randn(2, 1)}, ValueError, r"lam: expected a 1-D \(r,\) tensor"),
        ({"bias": torch.randn(5)}, ValueError, r"bias: expected shape \(6,\)"),
        ({"rank_mask": torch.ones(3, dtype=torch.bool)}, ValueError, r"rank_mask: expected shape \(2,\)"),
        ({"rank_mask": torch.ones(2)}, TypeError, r"rank_mask: expected a torch.bool tensor"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p: expected a float in \[0, 1\)"),
        ({"dropout_p": -0.5}, ValueError, r"dropout_p: expected a float in \[0, 1\)"),
        ({"scaling": float("nan")}, ValueError, r"scaling: expected a finite float"),
        ({"P": torch.randn(6, 2, dtype=torch.float64)}, TypeError, r"P: expected dtype torch.float32"),
        ({"x": torch.randn(3, 8, dtype=torch.float16)}, TypeError, r"weight: expected dtype torch.float16"),
        ({"x": torch.ones(3, 8, dtype=torch.int64)}, TypeError, r"x: expected a floating-point tensor"),
        ({"P": torch.randn(6, 2, device="meta")}, ValueError, r"P: expected device cpu"),
        ({"seed": -1, "dropout_p": 0.1}, ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
        (
            {"seed": torch.tensor(1.5), "dropout_p": 0.1},
            ValueError,
            r"seed: expected an int or a one-element int64",
        ),
        ({"backend": "nope"}, ValueError, r"backend: unknown backend 'nope'; expected 'auto' or one of"),
        ({"x": [1.0] * 8}, TypeError, r"x: expected a torch.Tensor"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_env_var_backend(monkeypatch):
    monkeypatch.setenv("ADALORA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="ADALORA_KERNELS_BACKEND: unknown backend 'nope'"):
        call()
    monkeypatch.setenv("ADALORA_KERNELS_BACKEND", "torch")
    call()
    call(backend="torch")  # explicit beats the env var


def test_unavailable_backend_asked_by_name_raises():
    ak.register_backend("broken", "adalora_kernels._no_such_module")
    try:
        with pytest.raises(ak.BackendUnavailableError, match="backend 'broken' is unavailable on cpu: import failed"):
            call(backend="broken")
        call()  # auto never picks it
    finally:
        from adalora_kernels import kernels

        kernels._MODULES.pop("broken")
        kernels._LOADED.pop("broken", None)


def test_auto_follows_a_backend_registered_again():
    """Auto's choice is found once per device type, and found again after a registration."""
    from adalora_kernels import kernels
    from adalora_kernels.ops import backend

    cpu = torch.device("cpu")
    first = backend.resolve_backend(None, cpu)
    if len(backend.runnable(cpu)) < 2:
        pytest.skip("one backend runs here")
    original = kernels._MODULES[first]
    ak.register_backend(first, "adalora_kernels._no_such_module")
    try:
        assert backend.resolve_backend(None, cpu) != first
    finally:
        ak.register_backend(first, original)
    assert backend.resolve_backend(None, cpu) == first
