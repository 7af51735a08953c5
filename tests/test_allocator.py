"""``RankAllocator`` step by step against PEFT 0.21 on the same weights and gradients."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from helpers import CPU, DEVICE, runnable_backends  # noqa: E402

import adalora_kernels as ak  # noqa: E402

NAMES = ["a", "b", "c", "d"]


def _base():
    torch.manual_seed(0)
    m = nn.Module()
    m.a, m.b, m.c, m.d = nn.Linear(16, 24), nn.Linear(24, 8), nn.Linear(16, 16), nn.Linear(8, 40, bias=False)
    return m


def build_pair(init_r, target_r, total_step, tinit, tfinal, deltaT, backend=None, beta1=0.85, beta2=0.85,
               device=CPU):  # fmt: skip
    """PEFT's model (on the CPU) and ours with the same adapters (on ``device``), and our allocator."""
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
        target_modules=NAMES, lora_alpha=8, beta1=beta1, beta2=beta2,
    )  # fmt: skip
    pm = peft.get_peft_model(_base(), cfg)
    ours = _base()
    for n in NAMES:
        svd = getattr(pm.base_model.model, n)
        layer = ak.AdaLoRALinear.from_linear(getattr(ours, n), init_r=init_r, lora_alpha=8)
        with torch.no_grad():
            svd.lora_E["default"].normal_()
            layer.P.copy_(svd.lora_B["default"])
            layer.lam.copy_(svd.lora_E["default"].view(-1))
            layer.Q.copy_(svd.lora_A["default"])
        setattr(ours, n, layer)
    ours.to(device)
    alloc = ak.RankAllocator(
        ours, target_r=target_r, total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
        beta1=beta1, beta2=beta2, backend=backend,
    )  # fmt: skip
    return pm, ours, alloc


def fake_step(pm, ours, gen, ties=False):
    """The same gradients and the same SGD step on both sides."""
    for n in NAMES:
        svd, layer = getattr(pm.base_model.model, n), getattr(ours, n)
        for peft_p, our_p in ((svd.lora_B["default"], layer.P), (svd.lora_E["default"], layer.lam),
                              (svd.lora_A["default"], layer.Q)):  # fmt: skip
            g = torch.randn(our_p.shape, generator=gen)
            if ties:  # few distinct values, whole ranks without gradient: scores tie, at zero and elsewhere
                g = (g * 2).round() / 2
                if our_p is layer.Q:
                    g[::2] = 0
            peft_p.grad, our_p.grad = g.view(peft_p.shape).clone(), g.to(our_p.device)
            with torch.no_grad():
                peft_p.sub_(0.01 * peft_p.grad)
                our_p.sub_(0.01 * our_p.grad)
            if ties:
                with torch.no_grad():
                    peft_p.copy_(peft_p.round()), our_p.copy_(our_p.round())


def fused_backends() -> list:
    """(backend, device) of every fused allocator backend: the CPU's, and the test device's where it is a GPU
    (the models are built there, so the Triton and csrc kernels are compared with the torch path on the GPU)."""
    pairs = [pytest.param(b, CPU, id=f"{b}-cpu") for b in runnable_backends(CPU) if b != "torch"]
    if DEVICE.type == "cuda":
        pairs += [pytest.param(b, DEVICE, id=f"{b}-cuda", marks=pytest.mark.gpu) for b in runnable_backends(DEVICE)
                  if b != "torch"]  # fmt: skip
    return pairs


def assert_same(pm, ours, alloc, step):
    pattern = pm.peft_config["default"].rank_pattern
    for n in NAMES:
        svd, layer = getattr(pm.base_model.model, n), getattr(ours, n)
        peft_lam = svd.lora_E["default"].view(-1)
        assert torch.equal(layer.lam, peft_lam), f"step {step}: {n}.lam differs"
        assert torch.equal(layer.lam * layer.rank_mask, peft_lam), f"step {step}: {n}.lam * rank_mask differs"
        assert torch.equal(layer.P, svd.lora_B["default"]) and torch.equal(layer.Q, svd.lora_A["default"])
    if pattern is None:
        assert alloc.rank_pattern is None, f"step {step}"
    else:
        assert alloc.rank_pattern == {n: pattern[f"{n}.lora_E.default"] for n in NAMES}, f"step {step}"


SCHEDULES = [  # init_r, target_r, total_step, tinit, tfinal, deltaT
    (6, 2, 20, 0, 0, 1),
    (6, 3, 30, 4, 6, 1),
    (8, 2, 40, 5, 10, 3),
    (5, 5, 12, 2, 3, 1),  # init_r == target_r: PEFT crashes in kthvalue(k=0), we keep every rank
    (4, 0, 16, 1, 4, 2),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_by_step_parity_with_peft(schedule, ties):
    init_r, target_r, total, tinit, tfinal, deltaT = schedule
    pm, ours, alloc = build_pair(init_r, target_r, total, tinit, tfinal, deltaT, backend="torch")
    gen = torch.Generator().manual_seed(1)
    for step in range(total + 5):  # past total_step too
        fake_step(pm, ours, gen, ties)
        budget = alloc.update_and_allocate(step)
        if init_r == target_r:  # PEFT crashes here (kthvalue with k = 0): every rank must stay
            if alloc.budget_schedule(step)[1] or step >= total - tfinal:
                pm.peft_config["default"].rank_pattern = {f"{n}.lora_E.default": [True] * init_r for n in NAMES}
        else:
            pm.base_model.update_and_allocate(step)
        assert budget == pm.base_model.rankallocator.budget_schedule(step)[0]
        assert_same(pm, ours, alloc, step)
    if init_r > target_r:
        kept = sum(sum(v) for v in alloc.rank_pattern.values())
        assert kept <= target_r * len(NAMES)
        assert all(bool(getattr(ours, n).rank_mask.eq(torch.tensor(v)).all()) for n, v in alloc.rank_pattern.items())


def test_budget_schedule_matches_peft():
    pm, _, alloc = build_pair(12, 4, 100, 10, 20, 1)
    for step in range(0, 120):
        assert alloc.budget_schedule(step) == pm.base_model.rankallocator.budget_schedule(step)


@pytest.mark.parametrize("backend", runnable_backends(CPU))
def test_no_host_sync_inside_update(backend, monkeypatch):
    _, ours, alloc = build_pair(6, 2, 20, 2, 5, 1, backend=backend)
    gen = torch.Generator().manual_seed(2)

    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside update_and_allocate")

        return raiser

    for step in range(22):
        for p in ours.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
                m.setattr(torch.Tensor, name, forbid(name))
            alloc.update_and_allocate(step)
    assert alloc.rank_pattern is not None  # allowed outside the step


@pytest.mark.parametrize("at", [9, 20])  # budgeting; the final phase (a frozen pattern, loaded with grad mode on)
def test_state_dict_resume_gives_identical_results(at):
    pm, ours, alloc = build_pair(6, 2, 24, 2, 6, 2)
    gen = torch.Generator().manual_seed(3)
    for step in range(at):
        fake_step(pm, ours, gen)
        alloc.update_and_allocate(step)
    state = alloc.state_dict()
    snapshot = {k: v.clone() for k, v in ours.state_dict().items()}
    gen_state = gen.get_state()
    trace = []
    for step in range(at, 28):
        fake_step(pm, ours, gen)
        trace.append((alloc.update_and_allocate(step), alloc.rank_pattern, ours.d.lam.clone()))
    # a fresh allocator on a model restored to the snapshot
    ours.load_state_dict(snapshot)
    fresh = ak.RankAllocator(ours, target_r=2, total_step=24, tinit=2, tfinal=6, deltaT=2)
    fresh.load_state_dict(state)
    gen.set_state(gen_state)
    for i, step in enumerate(range(at, 28)):
        fake_step(pm, ours, gen)
        budget = fresh.update_and_allocate(step)
        assert (budget, fresh.rank_pattern) == trace[i][:2]
        assert torch.equal(ours.d.lam, trace[i][2])


def test_replaced_adapter_tensors_are_followed_and_a_changed_rank_is_refused():
    pm, ours, alloc = build_pair(6, 2, 24, 2, 6, 2)
    twin, twin_alloc = copy.deepcopy(ours), None
    twin_alloc = ak.RankAllocator(twin, target_r=2, total_step=24, tinit=2, tfinal=6, deltaT=2)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        if step == 6:  # new parameter objects with the same values (a load with assign=True)
            twin.load_state_dict({k: v.clone() for k, v in twin.state_dict().items()}, assign=True)
            assert twin.a.lam is not twin_alloc.triplets[0].lam
        state = gen.get_state()
        fake_step(pm, ours, gen)
        gen.set_state(state)
        fake_step(pm, twin, gen)  # (PEFT's model steps twice: it is not compared here)
        assert alloc.update_and_allocate(step) == twin_alloc.update_and_allocate(step)
        assert alloc.rank_pattern == twin_alloc.rank_pattern
    for n in NAMES:
        assert torch.equal(getattr(ours, n).lam, getattr(twin, n).lam)
    ours.b.keep_ranks(torch.arange(6) != 3)  # a rank change mid-training: the EMAs and budget no longer fit
    with pytest.raises(ValueError, match=r"^b: its adapter is now P, lam, Q of shapes"):
        alloc.update_and_allocate(12)
    assert alloc.calls == 12


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"total_step": 0}, ValueError, "total_step: expected a positive int"),
        ({"total_step": None}, TypeError, "total_step: expected an int"),
        ({"tinit": 15, "tfinal": 5}, ValueError, "tinit: expected tinit < total_step - tfinal = 15"),
        ({"target_r": 7}, ValueError, r"final budget target_r × 1 layers within the 6 ranks the layers have, got 7"),
        ({"beta1": 1.0}, ValueError, r"beta1: expected a float in \(0, 1\)"),
        ({"beta2": 0.0}, ValueError, r"beta2: expected a float in \(0, 1\)"),
        ({"deltaT": 0}, ValueError, "deltaT: expected an int >= 1"),
        ({"init_r": 5}, ValueError, "init_r: expected the layers' rank"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = nn.Sequential(ak.AdaLoRALinear(4, 4, init_r=6))
    args = {"target_r": 2, "total_step": 20} | kwargs
    with pytest.raises(exc, match=match):
        ak.RankAllocator(model, **args)


def test_model_without_adalora_layers():
    with pytest.raises(ValueError, match="model: no AdaLoRALinear layer found"):
        ak.RankAllocator(nn.Sequential(nn.Linear(2, 2)), target_r=1, total_step=10)


def test_missing_grad_is_named():
    model = nn.Sequential(ak.AdaLoRALinear(4, 4, init_r=3))
    alloc = ak.RankAllocator(model, target_r=1, total_step=10)
    model[0].P.grad = torch.zeros_like(model[0].P)
    with pytest.raises(RuntimeError, match=r"0\.lam has no \.grad"):
        alloc.update_and_allocate(0)


def _adapter_set(dtype, shapes=((16, 6, 24), (40, 6, 8), (3, 6, 130), (16, 6, 8), (40, 6, 24))):
    gen = torch.Generator().manual_seed(4)
    params, grads = [], []
    for out_f, r, in_f in shapes:
        params.append(tuple(torch.randn(s, generator=gen, dtype=dtype) for s in ((out_f, r), (r,), (r, in_f))))
        grads.append(tuple(torch.randn(p.shape, generator=gen, dtype=dtype) for p in params[-1]))
    return params, grads


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_sensitivity_update_matches_torch(backend, device, dtype):
    from adalora_kernels.kernels.layout import FlatLayout
    from adalora_kernels.ops.sensitivity import sensitivity_update

    params, grads = _adapter_set(dtype)
    params, grads = ([tuple(t.to(device) for t in triple) for triple in ts] for ts in (params, grads))
    layout = FlatLayout([(P.shape[0], lam.numel(), Q.shape[1]) for P, lam, Q in params], dtype, device)
    state = {b: (layout.zeros(), layout.zeros()) for b in ("torch", backend)}
    for _ in range(3):
        scores = {b: sensitivity_update(layout, params, grads, *state[b], 0.85, 0.7, backend=b) for b in state}
        tol = {"rtol": 1e-6, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 0}
        torch.testing.assert_close(scores[backend], scores["torch"], **tol)
        for a, b in zip(state[backend], state["torch"]):
            assert torch.equal(a, b)  # elementwise EMAs: bit for bit
        grads = [tuple(g * 0.5 + 0.1 for g in t) for t in grads]


@pytest.mark.parametrize("fused,device", fused_backends())
def test_fused_allocator_run_matches_torch_run(fused, device):
    runs = {}
    for backend in ("torch", fused):
        pm, ours, alloc = build_pair(6, 2, 24, 2, 6, 2, backend=backend, device=device)
        gen = torch.Generator().manual_seed(5)
        trace = []
        for step in range(27):
            fake_step(pm, ours, gen)
            trace.append(
                (
                    alloc.update_and_allocate(step),
                    alloc.rank_pattern,
                    [getattr(ours, n).lam.clone() for n in NAMES],
                )
            )
        runs[backend] = trace
    for (b1, p1, l1), (b2, p2, l2) in zip(runs["torch"], runs[fused]):
        assert b1 == b2 and p1 == p2
        assert all(torch.equal(x, y) for x, y in zip(l1, l2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends())
def test_no_host_sync_on_gpu(backend):
    """On CUDA, torch's sync debug mode turns every host synchronisation inside the step into an error."""
    model = torch.nn.Sequential(ak.AdaLoRALinear(64, 48, init_r=6), ak.AdaLoRALinear(48, 32, init_r=6)).cuda()
    alloc = ak.RankAllocator(model, target_r=2, total_step=20, tinit=2, tfinal=5, backend=backend)
    for step in range(22):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            alloc.update_and_allocate(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert alloc.rank_pattern is not None


def test_layout_views_are_made_once_per_buffer_and_follow_it():
    from adalora_kernels.kernels.layout import FlatLayout

    layout = FlatLayout([(3, 2, 4), (5, 1, 2)], torch.float32, torch.device("cpu"))
    a, b = layout.zeros(), layout.zeros()
    views_a, views_b = layout.views(a), layout.views(b)
    assert layout.views(a) is views_a and layout.views(b) is views_b
    views_b[1][2].fill_(7.0)  # Q (1 × 2) of layer 1, in b only
    assert a.abs().sum() == 0 and b.sum() == 14.0
    assert layout.views(torch.ones_like(a))[0][0].sum() == 6  # a new buffer gets views of its own
