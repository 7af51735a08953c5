"""The dropout mask of DESIGN §4 — word ``col % 4`` of ``philox4x32_10((col // 4, row, 0, 0), seed)`` as a uniform,
kept where ``>= p`` — is one mask: the reference's (written from the definition, checked against Philox's published
known answers) and every backend's, bit for bit, so a run can change backend and keep its masks."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, keep_mask, runnable_backends

from adalora_kernels import reference

SEEDS = [0, 5, 2**32 + 5, 2**40 + 12345, 2**63 - 1]  # the high half of the seed is Philox's second key word
CASES = [((37, 53), 0.1), ((5, 130), 0.5), ((64, 64), 0.7), ((9, 3), 0.3), ((200, 260), 1e-9), ((3, 7), 0.9999999)]


def _words(seed: int, *counter: int) -> list[int]:
    return [int(w) for w in reference.philox4x32(seed, *(torch.tensor([c]) for c in counter))]


def test_reference_philox_gives_the_published_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (counter, key -> output)."""
    assert _words(0, 0, 0, 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert _words(ones | ones << 32, ones, ones, ones, ones) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert _words(0xA4093822 | 0x299F31D0 << 32, *pi) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _uniform32(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64).to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9999, 0.9999999])
def test_the_threshold_is_where_the_float32_uniform_reaches_p(p):
    t = reference.dropout_threshold(p)
    p32 = torch.tensor(p, dtype=torch.float32)
    assert 0 <= t <= 2**31
    assert t == 2**31 or bool(_uniform32(t) >= p32)
    assert t == 0 or not bool(_uniform32(t - 1) >= p32)


def test_the_reference_mask_reads_the_words_as_documented():
    seed, rows, cols, p = 2**40 + 7, 3, 10, 0.4
    keep = reference.dropout_keep_mask((rows, cols), p, seed)
    t = reference.dropout_threshold(p)
    for row in range(rows):
        for col in range(cols):
            w = _words(seed, col // 4, row)[col % 4]
            v = w ^ 0xFFFFFFFF if w >= 2**31 else w  # the word as int32, folded: ~w where negative
            assert bool(keep[row, col]) == (v >= t), (row, col)
    assert abs(reference.dropout_keep_mask((256, 256), 0.3, 1).float().mean().item() - 0.7) < 0.01


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("seed", SEEDS)
def test_every_backend_draws_the_reference_mask(backend, seed):
    for shape, p in CASES:
        got = keep_mask(backend, shape, p, seed).cpu()
        assert torch.equal(got, reference.dropout_keep_mask(shape, p, seed)), (shape, p)


def check_the_csrc_mask_at_every_tail() -> None:
    """The extension's CPU mask against the reference: every column count to 70 (vector tails of every length),
    blocks of rows past the first, seeds with high bits set, rates at both ends (run per instruction set by
    ``test_csrc.py``)."""
    shapes = [*(((3, c), 0.3) for c in range(1, 71)), ((150, 97), 0.1), ((70, 33), 1e-9), ((9, 64), 0.999)]
    for seed in (3, 2**40 + 12345, 2**63 - 1):
        for shape, p in shapes:
            got = keep_mask("csrc", shape, p, seed)
            assert torch.equal(got, reference.dropout_keep_mask(shape, p, seed)), (seed, shape, p)


def test_the_torch_ops_mask_is_the_references():
    """The torch backend's own Philox (int64 ops that wrap), used where no mask kernel is built."""
    from adalora_kernels.kernels.torch_composite import keep_mask_by_torch_ops

    for seed in SEEDS:
        for shape, p in [*CASES, ((600, 9), 0.2)]:  # 600 rows: more than one block of rows on the CPU
            got = keep_mask_by_torch_ops(shape, p, seed, DEVICE).cpu()
            assert torch.equal(got, reference.dropout_keep_mask(shape, p, seed)), (seed, shape, p)


@pytest.mark.parametrize("backend", runnable_backends())
def test_a_backend_applies_the_mask_it_draws(backend):
    """The fused op with dropout against the fp64 reference given the reference's mask: the mask applied inside
    forward and backward is the one drawn, whatever the backend."""
    from helpers import make_inputs

    import adalora_kernels as ak

    x, w, b, P, lam, Q, _ = make_inputs((9,), 40, 24, 4, torch.float64)
    leaves = [v.requires_grad_() for v in (x, P, lam, Q)]
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=0.5, dropout_p=0.3, seed=77, backend=backend)
    keep = reference.dropout_keep_mask((9, 40), 0.3, 77, DEVICE)
    ref = reference.adalora_linear_ref(x, w, b, P, lam, Q, 0.5, keep=keep, dropout_p=0.3)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
