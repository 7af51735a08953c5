"""The cases of the reliability round (silently wrong numbers, half-changed state, checkpoints that could be lost,
small edges), each side by side with plain PEFT where PEFT has an answer."""

import contextlib
import copy
import errno
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from helpers import CPU, runnable_backends  # noqa: E402
from test_allocator import NAMES, build_pair, fake_step  # noqa: E402
from test_faults import _model, _same_state, _state  # noqa: E402
from test_integrations import _Data, batch, llama  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import checkpoint, load_adalora, save_adalora  # noqa: E402

SCHEDULE = {"init_r": 6, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 3, "deltaT": 2}
FINAL = SCHEDULE["total_step"] - SCHEDULE["tfinal"]

# ------------------------------------------------------------------------------------------ silently wrong


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = DoubledLinear(12, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_base_layer_that_overrides_forward_keeps_its_forward(caplog):
    plain = peft.get_peft_model(
        _Net(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["a", "b"])
    )
    for name, p in plain.named_parameters():
        if "lora_E" in name:
            torch.nn.init.normal_(p)
    fast = copy.deepcopy(plain)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="adalora_kernels"):
        warnings.simplefilter("always")
        ak.accelerate_peft(fast)
    assert "1 of 2 AdaLoRA layers fused" in caplog.text
    assert any("a (SVDLinear over DoubledLinear: DoubledLinear overrides nn.Linear.forward)" in str(w.message)
               for w in caught)  # fmt: skip
    x = torch.randn(5, 12)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
    fast.base_model.model.a.base_layer.__class__ = DoubledLinear  # (unchanged) and a swap after accelerate_peft:
    fast.base_model.model.b.base_layer.__class__ = DoubledLinear
    plain.base_model.model.b.base_layer.__class__ = DoubledLinear
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)  # PEFT's forward, decided on each call
    with pytest.raises(TypeError, match=r"a: DoubledLinear overrides nn\.Linear\.forward"):
        ak.inject_adalora(_Net(), ["a", "b"])
    with pytest.raises(TypeError, match=r"DoubledLinear overrides nn\.Linear\.forward"):
        ak.AdaLoRALinear.from_linear(DoubledLinear(3, 3))


def test_an_int8_layer_holding_float_weights_keeps_its_forward():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    torch.manual_seed(0)
    base = nn.Sequential(bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True))  # a model not flagged as 8-bit
    plain = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0"]))
    fast = ak.accelerate_peft(copy.deepcopy(plain))
    x = torch.randn(3, 16)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


def _first_call_at(step):
    pm, ours, alloc = build_pair(**SCHEDULE)
    fast = ak.accelerate_peft(copy.deepcopy(pm))
    gen = torch.Generator().manual_seed(0)
    fake_step(pm, ours, gen)
    for model in (pm, fast):
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.grad = torch.ones_like(p)
    return pm, fast, ours, alloc


def test_a_first_call_at_the_final_step_raises_instead_of_pruning_every_rank():
    pm, fast, ours, alloc = _first_call_at(FINAL)
    with pytest.raises(KeyError):  # PEFT: its EMAs were never made
        pm.base_model.update_and_allocate(FINAL)
    for model, allocate in ((ours, alloc.update_and_allocate), (fast, fast.base_model.update_and_allocate)):
        before = _state(model)
        with pytest.raises(RuntimeError, match="no sensitivity scores were ever computed"):
            allocate(FINAL)
        assert _same_state(before, _state(model))  # no λ zeroed, no pattern frozen
    assert alloc.rank_pattern is None


def test_a_restored_state_at_the_final_step_freezes_the_last_pattern():
    """A run resumed at the final step with the allocator's state_dict: the pattern that the uninterrupted run
    freezes there, from the same scores."""
    pm, ours, alloc = build_pair(**SCHEDULE)
    other_pm, other, other_alloc = build_pair(**SCHEDULE)
    gen, other_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for step in range(FINAL):
        fake_step(pm, ours, gen)
        fake_step(other_pm, other, other_gen)
        alloc.update_and_allocate(step)
        other_alloc.update_and_allocate(step)
    resumed = ak.RankAllocator(other, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)
    resumed.load_state_dict(copy.deepcopy(other_alloc.state_dict()))
    alloc.update_and_allocate(FINAL)
    resumed.update_and_allocate(FINAL)
    assert resumed.rank_pattern == alloc.rank_pattern and sum(map(sum, alloc.rank_pattern.values())) == 8


@pytest.mark.parametrize("backend", runnable_backends(CPU))
def test_dropout_seeds_differing_in_high_bits_draw_different_masks(backend):
    kernels = ak.kernels.get_backend(backend, CPU)
    masks = [kernels.dropout_keep_mask((64, 64), 0.5, seed, CPU) for seed in (1, 1 + 2**32, 1 + 2**40)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_a_negative_seed_tensor_is_refused():
    layer = ak.AdaLoRALinear(8, 4, init_r=2, lora_dropout=0.5)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"seed: expected a value in \[0, 2\*\*63\), got -3"):
        ak.adalora_linear(x, layer.weight, layer.bias, layer.P, layer.lam, layer.Q, scaling=1.0, dropout_p=0.5,
                          seed=torch.tensor(-3))  # fmt: skip


def _trainer(model, tmp_path, callback, steps, save_steps=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback])


def _injected():
    model = llama()
    ak.inject_adalora(model, ["q_proj", "v_proj"], init_r=4)
    return model


@pytest.mark.parametrize("resume_at", [4, 5, 6, 7])  # budgeting, the final step (6 - 1 = 5 done), past it (frozen)
def test_a_resumed_trainer_run_of_injected_layers_keeps_the_allocator_state(tmp_path, resume_at):
    steps, schedule = 8, {"target_r": 2, "tinit": 1, "tfinal": 2}
    whole = ak.AdaLoRACallback(**schedule)
    _trainer(_injected(), tmp_path / "whole", whole, steps).train()
    first = ak.AdaLoRACallback(**schedule)
    _trainer(_injected(), tmp_path / "cut", first, steps, save_steps=resume_at).train()
    assert (tmp_path / "cut" / f"checkpoint-{resume_at}" / "adalora_allocator.pt").exists()
    resumed = ak.AdaLoRACallback(**schedule)
    trainer = _trainer(_injected(), tmp_path / "cut", resumed, steps)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{resume_at}"))
    assert resumed.allocator.rank_pattern == whole.allocator.rank_pattern
    for a, b in zip(resumed.allocator.state_dict()["ema_ipt"], whole.allocator.state_dict()["ema_ipt"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_resume_without_the_allocator_state_says_so(tmp_path):
    first = ak.AdaLoRACallback(target_r=2, tinit=1, tfinal=2)
    _trainer(_injected(), tmp_path, first, 8, save_steps=3).train()
    (tmp_path / "checkpoint-3" / "adalora_allocator.pt").unlink()
    with pytest.warns(UserWarning, match="resumed at step 3 without the allocator's state"):
        _trainer(_injected(), tmp_path, ak.AdaLoRACallback(target_r=2, tinit=1, tfinal=2), 8).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-3")
        )


# ------------------------------------------------------------------------------------------ half-changed state


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"lora_dropout": 5}, "lora_dropout: expected a float in"),
        ({"lora_alpha": float("nan")}, "lora_alpha: expected a finite number"),
        ({"lora_alpha": "8"}, "lora_alpha: expected a finite number"),
        ({"init_r": 4.0}, "init_r: expected an int"),
        ({"init_r": None}, r"lacks \['init_r'\]"),
    ],
)
def test_load_adalora_checks_every_layer_before_changing_any(tmp_path, edit, message):
    save_adalora(_model(0), tmp_path)
    path = tmp_path / "adalora_config.json"
    config = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            del config["layers"]["2"][key]
        else:
            config["layers"]["2"][key] = value
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    before = _state(plain)
    with pytest.raises(ValueError, match=f"2: the checkpoint's config entry .*{message}"):
        load_adalora(plain, tmp_path)
    assert _same_state(before, _state(plain)) and not any(isinstance(m, ak.AdaLoRALinear) for m in plain.modules())


def _to_the_final_step():
    pm, ours, alloc = build_pair(**SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    for step in range(FINAL):
        fake_step(pm, ours, gen)
        alloc.update_and_allocate(step)
    return ours, alloc


_WRITES = [(torch.Tensor, "copy_"), (torch.Tensor, "fill_"), (torch.Tensor, "masked_fill_"), (torch, "_foreach_copy_")]


def test_an_interrupt_anywhere_in_the_final_step_leaves_mask_and_pattern_agreeing(monkeypatch):
    """A KeyboardInterrupt at each tensor write of the final step in turn (the k-th copy, fill or foreach copy),
    then the retry and the next step: the layers' rank_mask is the recorded pattern, as in an uninterrupted run."""
    reference, ref_alloc = _to_the_final_step()
    for step in (FINAL, FINAL + 1):
        ref_alloc.update_and_allocate(step)
    interrupted_at = 0
    for k in range(1, 200):
        ours, alloc = _to_the_final_step()
        writes = []
        with monkeypatch.context() as m:
            for owner, name in _WRITES:
                real = getattr(owner, name)

                def write(*args, _real=real, _writes=writes, _k=k, **kwargs):
                    _writes.append(1)
                    if len(_writes) == _k:
                        raise KeyboardInterrupt
                    return _real(*args, **kwargs)

                m.setattr(owner, name, write)
            try:
                alloc.update_and_allocate(FINAL)
            except KeyboardInterrupt:
                interrupted_at = k
        if interrupted_at != k:
            break  # the k-th write does not exist: every write was interrupted once
        for step in (FINAL, FINAL + 1):  # the retry, then the run going on
            alloc.update_and_allocate(step)
        assert alloc.rank_pattern == ref_alloc.rank_pattern, k
        for n in NAMES:
            layer, ref = getattr(ours, n), getattr(reference, n)
            assert layer.rank_mask.tolist() == alloc.rank_pattern[n], (k, n)
            assert torch.equal(layer.rank_mask, ref.rank_mask) and torch.equal(layer.lam, ref.lam), (k, n)
    assert interrupted_at >= 2


def test_an_unknown_backend_is_refused_before_anything_changes():
    plain = peft.get_peft_model(llama(), peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"]))
    classes = [type(m) for m in plain.modules()]
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        ak.accelerate_peft(plain, backend="nope")
    assert [type(m) for m in plain.modules()] == classes
    model = llama()
    before = _state(model)
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        ak.inject_adalora(model, ["q_proj"], backend="nope")
    assert _same_state(before, _state(model))
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        ak.RankAllocator(_injected(), target_r=2, total_step=10, backend="nope")


def _peft_llama():
    return peft.get_peft_model(llama(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2,
                                                           target_modules=["q_proj", "v_proj"]))  # fmt: skip


@pytest.mark.parametrize("move", ["double", "half", "bfloat16"])
def test_the_allocator_follows_a_dtype_move(move):
    plain = _peft_llama()
    fast = ak.accelerate_peft(copy.deepcopy(plain))
    ours = _injected()
    alloc = ak.RankAllocator(ours, target_r=2, total_step=10, tinit=1, tfinal=2)
    steps = [(plain, plain.base_model.update_and_allocate), (fast, fast.base_model.update_and_allocate),
             (ours, alloc.update_and_allocate)]  # fmt: skip
    for step in range(4):
        if step == 2:
            for model, _ in steps:
                getattr(model, move)()
        for model, allocate in steps:
            model.train()
            model(**batch(step)).loss.float().backward()
            allocate(step)
            model.zero_grad()
    dtype = next(p for p in ours.parameters() if p.requires_grad).dtype
    assert alloc.state_dict()["ema_ipt"].dtype == dtype
    assert fast.peft_config["default"].rank_pattern == plain.peft_config["default"].rank_pattern


def test_every_grad_none_raises_as_peft_does():
    plain = _peft_llama()
    fast = ak.accelerate_peft(copy.deepcopy(plain))
    alloc = ak.RankAllocator(_injected(), target_r=2, total_step=10, tinit=1, tfinal=2)
    with pytest.raises(TypeError):
        plain.base_model.update_and_allocate(3)
    with pytest.raises(TypeError, match=r"has no \.grad"):
        fast.base_model.update_and_allocate(3)
    with pytest.raises(TypeError, match=r"has no \.grad; call it after loss\.backward"):
        alloc.update_and_allocate(3)  # (MissingGradientError: a RuntimeError too)


def test_a_refused_step_leaves_the_allocator_as_it_was():
    """A missing .grad on a step that goes back before the final step, after the pattern froze: refused before
    the pattern is unfrozen or the call counted (the layers' no-allocation warning counts calls)."""
    pm, ours, alloc = build_pair(**SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    for step in range(FINAL + 2):
        fake_step(pm, ours, gen)
        alloc.update_and_allocate(step)
    masks = {n: m.clone() for n, m in ours.named_buffers() if n.endswith("rank_mask")}
    state, calls = copy.deepcopy(alloc.state_dict()), alloc.calls
    assert state["final"] and not all(m.all() for m in masks.values())
    ours.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match=r"has no \.grad"):
        alloc.update_and_allocate(FINAL - 1)
    assert alloc.calls == calls and alloc.state_dict()["final"]
    assert all(torch.equal(m, masks[n]) for n, m in ours.named_buffers() if n.endswith("rank_mask"))
    fresh = ak.RankAllocator(ours, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)
    with pytest.raises(RuntimeError, match="no mask was ever computed"):
        fresh.update_and_allocate(FINAL + 1)
    assert fresh.calls == 0


def test_the_callback_takes_total_step_from_max_steps_for_peft_models_too(tmp_path):
    fast = ak.accelerate_peft(_peft_llama())  # total_step=10 in the config
    _trainer(fast, tmp_path, ak.AdaLoRACallback(), 6).train()
    assert fast.peft_config["default"].total_step == 6
    assert fast.peft_config["default"].rank_pattern is not None  # the final phase was reached at step 4


# ------------------------------------------------------------------------------------------ checkpoints


class _Interrupt(BaseException):
    pass


def _count_file_ops(monkeypatch, fail_at=None):
    ops = []
    for name in ("write", "replace", "remove"):
        real = getattr(checkpoint._Files, name)

        def op(*args, _real=real, _name=name):
            ops.append(_name)
            if fail_at is not None and len(ops) == fail_at:
                raise _Interrupt(f"interrupted at {_name}")
            return _real(*args)

        monkeypatch.setattr(checkpoint._Files, name, staticmethod(op))
    return ops


def _loaded(folder):
    model = _model(5)
    load_adalora(model, folder)
    return [model[0].lam.clone(), model[2].lam.clone()]


def test_a_save_interrupted_at_any_file_operation_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    save_adalora(_model(0), tmp_path)
    old = _loaded(tmp_path)
    new_model = _model(1)
    new = [new_model[0].lam.detach().clone(), new_model[2].lam.detach().clone()]
    with monkeypatch.context() as m:
        ops = _count_file_ops(m)
        save_adalora(new_model, tmp_path / "probe")
    assert len(ops) >= 3
    for fail_at in range(1, len(ops) + 1):
        with monkeypatch.context() as m:
            _count_file_ops(m, fail_at)
            with contextlib.suppress(_Interrupt):
                save_adalora(new_model, tmp_path)
        got = _loaded(tmp_path)
        assert any(all(torch.equal(a, b) for a, b in zip(got, want)) for want in (old, new)), fail_at
        save_adalora(_model(0), tmp_path)  # back to the old one for the next interruption
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "probe") == sorted(
            ["adalora_config.json", next(p.name for p in tmp_path.glob("adalora-*.safetensors"))]
        )


def test_saves_stay_inside_their_folder(tmp_path, monkeypatch):
    """A rename out of the folder fails as it does across filesystems (a symlink to another disk, a mount point),
    and a read-only parent refuses new files: a save writes and renames inside the folder only."""
    real_replace = os.replace

    def same_folder_only(src, dst):
        if os.path.dirname(os.path.realpath(src)) != os.path.dirname(os.path.realpath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", same_folder_only)
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    parent_before = sorted(os.listdir(tmp_path))
    save_adalora(_model(0), link)
    ak.integrations.export_peft(_model(0), link / "peft")
    assert sorted(os.listdir(tmp_path)) == parent_before
    assert _loaded(link)[0].shape == (4,)


# ------------------------------------------------------------------------------------------ small edges


def test_non_finite_weights_are_non_finite_where_peft_is():
    """The promise: outputs as PEFT's (bit for bit with PEFT's rounding); gradients non-finite exactly where
    PEFT's are, though an inf of PEFT's may be a NaN of ours and the reverse (the products associate otherwise)."""
    plain = peft.get_peft_model(nn.Sequential(nn.Linear(8, 6)), peft.AdaLoraConfig(init_r=3, target_r=1, total_step=10,
                                                                                   target_modules=["0"]))  # fmt: skip
    with torch.no_grad():
        layer = plain.base_model.model[0]
        layer.lora_E["default"].copy_(torch.tensor([[float("inf")], [1.0], [float("nan")]]))
        layer.lora_A["default"][1, 2] = float("inf")
    fast = ak.accelerate_peft(copy.deepcopy(plain))
    x = torch.randn(4, 8)
    outs = [m(x) for m in (plain, fast)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    for out in outs:
        out.sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
        if p.grad is not None:
            assert torch.equal(torch.isfinite(p.grad), torch.isfinite(q.grad)), n


def test_cli_output_paths_are_checked_before_the_run(tmp_path):
    def run(*args):
        command = [
            sys.executable,
            "-m",
            "adalora_kernels",
            "bench",
            "--quick",
            "--no-allocator",
            "--variants",
            "linear",
        ]
        done = subprocess.run([*command, *args], capture_output=True, text=True, cwd=tmp_path)
        return done.returncode, done.stderr.strip().splitlines()

    cases = {
        ("--device", "cpu:1"): "the CPU has no index",
        ("--json", ""): "--json: expected a file path, got ''",
        ("--json", "missing/"): "--json: missing/ is a folder",
        ("--json", "x" * 300 + ".json"): "--json: the file name is longer than",
        ("--json", "r.json", "--csv", "r.json"): "--csv: r.json is also the --json file",
        ("--json", "r.json", "--plot", "y" * 300 + ".png"): "--plot: the file name is longer than",
    }
    for args, message in cases.items():
        code, err = run(*args)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    assert os.listdir(tmp_path) == []  # nothing written, no JSON left behind by a failing --plot
