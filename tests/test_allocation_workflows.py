"""Where AdaLoRA users get stuck: allocation bound to the optimizer, a warning where it never runs, resumable
Trainer runs of PEFT models, export to plain LoRA, where the budget went, and the allocator's edges, side by side
with PEFT where PEFT has an answer."""

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_integrations import _Data, batch, gpt2, llama  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import export_lora, save_adalora  # noqa: E402

CFG = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 1, "tfinal": 2, "target_modules": ["q_proj", "v_proj"],
       "task_type": "CAUSAL_LM"}  # fmt: skip


def _peft():
    model = peft.get_peft_model(llama(), peft.AdaLoraConfig(**CFG))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()
    return model


def _injected():
    model = llama()
    ak.inject_adalora(model, ["q_proj", "v_proj"], init_r=4)
    return model


def _loop(model, opt, steps, allocate=None, skip=()):
    for step in range(steps):
        model.train()
        model(**batch(step)).loss.backward()
        if step in skip:  # what a GradScaler does on an overflow: no optimizer.step()
            opt.zero_grad()
            continue
        opt.step()
        if allocate is not None:
            allocate(step)
        opt.zero_grad()


# ------------------------------------------------------------------------------------------ bound to the optimizer


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_attach_steps_the_allocator_once_per_real_optimizer_step(kind):
    make = _injected if kind == "ours" else (lambda: ak.accelerate_peft(_peft()))
    by_hand, hooked = make(), None
    hooked = copy.deepcopy(by_hand)
    pair = []
    for model in (by_hand, hooked):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05)
        if kind == "ours":
            alloc = ak.RankAllocator(model, target_r=2, total_step=10, tinit=1, tfinal=2)
        else:
            alloc = model.base_model
        pair.append((model, opt, alloc))
    (m1, o1, a1), (m2, o2, a2) = pair
    _loop(m1, o1, 12, a1.update_and_allocate)
    handle = a2.attach(o2)
    _loop(m2, o2, 12)
    assert a2.step_count == 12
    if kind == "ours":
        assert a1.rank_pattern == a2.rank_pattern and a2.rank_pattern is not None
    else:
        assert m1.peft_config["default"].rank_pattern == m2.peft_config["default"].rank_pattern is not None
    handle.remove()
    _loop(m2, o2, 1)
    assert a2.step_count == 12  # detached
    a2.attach(o2)  # attached again after the remove: one step each
    other = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.05)
    for opt in (o2, other):  # a second hook, on the same optimizer or another, would step it twice a step
        with pytest.raises(RuntimeError, match="attach: already attached"):
            a2.attach(opt, start_step=0)
    _loop(m2, o2, 2)
    assert a2.step_count == 14  # two hooks would have counted 16


def test_a_skipped_optimizer_step_is_not_counted():
    model = _injected()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    alloc = ak.RankAllocator(model, target_r=2, total_step=10, tinit=1, tfinal=2)
    alloc.attach(opt)
    _loop(model, opt, 6, skip={2, 4})
    assert alloc.step_count == 4 and alloc.calls == 4


def test_attach_finds_the_optimizer_inside_a_wrapper():
    class Wrapper:  # the shape of Accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

        def zero_grad(self):
            self.optimizer.zero_grad()

    model = _injected()
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    alloc = ak.RankAllocator(model, target_r=2, total_step=10, tinit=1, tfinal=2)
    alloc.attach(Wrapper(inner))
    _loop(model, Wrapper(inner), 3)
    assert alloc.step_count == 3
    with pytest.raises(TypeError, match=r"optimizer: expected a torch\.optim\.Optimizer"):
        alloc.attach(object())
    with pytest.raises(ValueError, match="start_step: expected an int >= 0"):
        alloc.attach(inner, start_step=-1)


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_training_past_tinit_without_allocation_warns_once(kind):
    if kind == "ours":
        model = _injected()
        allocator = ak.RankAllocator(model, target_r=2, total_step=10, tinit=1, tfinal=2)  # made, never stepped
    else:
        model = ak.accelerate_peft(_peft())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(model, opt, 6)
    said = [w for w in caught if "trains as plain LoRA" in str(w.message)]
    assert len(said) == 1 and "attach(optimizer)" in str(said[0].message)
    if kind == "ours":
        assert allocator.calls == 0


def test_the_callback_skips_a_step_the_trainer_skipped():
    model = _injected()
    callback = ak.AdaLoRACallback(target_r=2, total_step=10, tinit=1, tfinal=2)
    args, state = None, transformers.TrainerState(max_steps=10)
    callback.on_train_begin(args, state, None, model=model)

    class Skipped:
        step_was_skipped = True

    callback.on_optimizer_step(args, state, None, model=model, optimizer=Skipped())
    assert callback.allocator.calls == 0


# ------------------------------------------------------------------------------------------ resuming a PEFT run


def _trainer(model, folder, callback, save_steps=None, steps=8):
    args = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback])


def _fresh_peft():
    torch.manual_seed(0)
    return ak.accelerate_peft(peft.get_peft_model(llama(), peft.AdaLoraConfig(**{**CFG, "total_step": 8})))


@pytest.mark.parametrize("resume_at", [3, 6, 7])  # budgeting with a mask taken, the final phase, its pattern frozen
def test_a_peft_trainer_run_resumes_from_its_checkpoint(tmp_path, resume_at):
    whole = _fresh_peft()
    log_whole = _trainer(whole, tmp_path / "whole", ak.AdaLoRACallback())
    log_whole.train()
    cut = _fresh_peft()
    _trainer(cut, tmp_path / "cut", ak.AdaLoRACallback(), save_steps=resume_at).train()
    resumed = _fresh_peft()
    trainer = _trainer(resumed, tmp_path / "cut", ak.AdaLoRACallback())
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{resume_at}"))
    assert resumed.peft_config["default"].rank_pattern == whole.peft_config["default"].rank_pattern is not None
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        if "lora_" in n:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (log_whole, trainer)]
    assert losses[1] == pytest.approx(losses[0][-len(losses[1]) :], rel=1e-4)
    # outside training, save_pretrained still writes PEFT's pruned adapter
    resumed.save_pretrained(tmp_path / "final")
    pruned = peft.PeftModel.from_pretrained(llama(), tmp_path / "final")
    assert pruned.peft_config["default"].rank_pattern is not None


def test_a_state_from_another_model_is_refused_naming_the_layer():
    a = ak.accelerate_peft(_peft())
    b = ak.accelerate_peft(peft.get_peft_model(llama(), peft.AdaLoraConfig(**{**CFG, "target_modules": ["k_proj"]})))
    with pytest.raises(ValueError, match="saved for layers"):
        b.base_model.rankallocator.load_state_dict(a.base_model.rankallocator.state_dict())


# ------------------------------------------------------------------------------------------ export to LoRA


@pytest.mark.parametrize("factory,targets", [(llama, ["q_proj", "v_proj"]), (gpt2, ["c_attn"])])
@pytest.mark.parametrize("uniform", [False, True])
def test_an_exported_lora_adapter_gives_the_adalora_outputs(tmp_path, factory, targets, uniform):
    model = factory()
    ak.inject_adalora(model, targets, init_r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lam"):
                p.normal_()
        first = next(m for m in model.modules() if isinstance(m, ak.AdaLoRALinear))
        first.lam[0] = 0  # pruned by λ
        first.rank_mask[1] = False  # pruned by the frozen pattern
    ids = batch()["input_ids"]
    want = model(input_ids=ids).logits
    export_lora(model, tmp_path / "lora", uniform_rank=uniform)
    lora = peft.PeftModel.from_pretrained(factory(), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == peft.PeftType.LORA
    torch.testing.assert_close(lora(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert (set(ranks.values()) == {4}) if uniform else (min(ranks.values()) == 2 and max(ranks.values()) == 4)


def test_export_lora_from_checkpoint_folders_and_the_cli(tmp_path):
    from adalora_kernels.cli import main

    plain = _peft()
    ids = batch()["input_ids"]
    want = plain(input_ids=ids).logits
    plain.save_pretrained(tmp_path / "peft")  # PEFT's AdaLoRA adapter folder
    assert main(["export-lora", str(tmp_path / "peft"), str(tmp_path / "lora")]) == 0
    lora = peft.PeftModel.from_pretrained(llama(), tmp_path / "lora")
    torch.testing.assert_close(lora(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    ours = _injected()
    save_adalora(ours, tmp_path / "ours")
    assert main(["export-lora", str(tmp_path / "ours"), str(tmp_path / "lora2")]) == 2  # λ all zero: nothing kept
    assert main(["export-lora", str(tmp_path / "missing"), str(tmp_path / "lora3")]) == 2


# ------------------------------------------------------------------------------------------ where the budget went


def test_rank_report_and_the_trainer_logs(tmp_path):
    model = _injected()
    callback = ak.AdaLoRACallback(target_r=2, tinit=1, tfinal=2)
    trainer = _trainer(model, tmp_path, callback, steps=8)
    trainer.train()
    report = ak.rank_report(model)
    assert len(report) == 4 and {r["module"] for r in report} == {"q_proj", "v_proj"}
    assert sum(r["kept_r"] for r in report) <= 8 and abs(sum(r["share"] for r in report) - 1) < 1e-9
    assert all(r["init_r"] == 4 for r in report)
    logged = [h for h in trainer.state.log_history if "adalora_kept/q_proj" in h]
    assert logged and logged[-1]["adalora_kept/q_proj"] + logged[-1]["adalora_kept/v_proj"] <= 8
    peft_report = ak.rank_report(_peft())
    assert {r["module"] for r in peft_report} == {"q_proj", "v_proj"} and all(r["kept_r"] == 4 for r in peft_report)


# ------------------------------------------------------------------------------------------ the allocator's edges


def test_target_r_above_init_r_is_refused_where_peft_fails_in_kthvalue():
    cfg = {**CFG, "target_r": 6}
    plain = peft.get_peft_model(llama(), peft.AdaLoraConfig(**cfg))
    plain.train()
    plain(**batch()).loss.backward()
    with pytest.raises(RuntimeError, match="kthvalue"):  # PEFT: at the first masking step
        plain.base_model.update_and_allocate(3)
    with pytest.raises(ValueError, match="target_r: expected 0 <= target_r and a final budget"):
        ak.accelerate_peft(peft.get_peft_model(llama(), peft.AdaLoraConfig(**cfg)))  # at construction
    with pytest.raises(ValueError, match="target_r: expected 0 <= target_r and a final budget"):
        ak.RankAllocator(_injected(), target_r=6, total_step=10)


def test_delete_then_add_adapter_trains_the_new_one_where_peft_keeps_a_stale_name():
    cfg = peft.AdaLoraConfig(**CFG)
    plain, fast = _peft(), ak.accelerate_peft(_peft())
    for model in (plain, fast):
        model.delete_adapter("default")
        model.add_adapter("other", cfg)
        model.set_adapter("other")
        model.train()
    with pytest.raises(KeyError, match="default"):  # PEFT: its trainable adapter's name is the deleted one
        plain(**batch())
    fast(**batch()).loss.backward()
    fast.base_model.update_and_allocate(3)
    assert fast.base_model.rankallocator.adapter_name == "other"
    assert type(fast.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "FusedSVDLinear"
