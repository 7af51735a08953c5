"""A PEFT model after ``accelerate_peft`` behaves as the PEFT model in every workflow, side by side with plain PEFT
on the same weights: copies, pickles, several adapters, scaling changes, disabled adapters, config edits,
resizing, hooks, reloading for training, refusals and PEFT's allocator interface."""

import copy
import io
import pickle

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_integrations import GPT2_TARGETS, batch, gpt2, llama, randomize_lams  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import import_peft  # noqa: E402
from adalora_kernels.integrations.peft_classes import FusedSVDLinear  # noqa: E402

CFG = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 2, "tfinal": 3, "deltaT": 2, "lora_alpha": 8}


def _pair(factory=gpt2, targets=GPT2_TARGETS, task_type="CAUSAL_LM", **cfg):
    model = peft.get_peft_model(factory(), peft.AdaLoraConfig(target_modules=targets, task_type=task_type,
                                                               **(CFG | cfg)))  # fmt: skip
    randomize_lams(model)
    return model, ak.accelerate_peft(copy.deepcopy(model))


def _fused_calls(monkeypatch):
    calls = []
    real = FusedSVDLinear.fusable

    def spy(self, x, base=None):
        adapter = real(self, x, base)
        calls.append(bool(adapter))
        return adapter

    monkeypatch.setattr(FusedSVDLinear, "fusable", spy)
    return calls


def _logits(model, seed=0):
    return model(input_ids=batch(seed)["input_ids"]).logits


def _train(models, steps, start=0):
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in models]
    for step in range(start, start + steps):
        losses = []
        for model, opt in zip(models, opts):
            model.train()
            loss = model(**batch(step)).loss
            loss.backward()
            opt.step()
            assert model.base_model.update_and_allocate(step) is None  # PEFT's return value
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=5e-5), f"step {step}"
        patterns = [m.peft_config["default"].rank_pattern for m in models]
        assert patterns[1] == patterns[0], f"step {step}"


def test_deepcopy_is_independent_and_fused(monkeypatch):
    plain, fast = _pair()
    before = {n: p.clone() for n, p in fast.named_parameters()}
    twin = copy.deepcopy(fast)
    calls = _fused_calls(monkeypatch)
    torch.testing.assert_close(_logits(twin), _logits(plain))
    assert calls and all(calls)
    _train([plain, twin], 6)  # the copy trains and allocates on its own parameters, as PEFT
    assert fast.peft_config["default"].rank_pattern is None  # the original's allocator did not step
    assert all(torch.equal(p, before[n]) for n, p in fast.named_parameters())
    with torch.no_grad():  # the copy's forward reads the copy's weights, not the original's
        next(p for n, p in fast.named_parameters() if "lora_E" in n).mul_(3)
    torch.testing.assert_close(_logits(twin), _logits(plain))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_whole_model_pickles(how):
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    if how == "pickle":
        back = pickle.loads(pickle.dumps(fast))
    else:
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    assert type(back.base_model.model.model.layers[0].self_attn.q_proj) is FusedSVDLinear
    torch.testing.assert_close(_logits(back), _logits(plain))
    _train([plain, back], 4)


def test_several_adapters_set_and_delete(monkeypatch):
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    for model in (plain, fast):
        model.add_adapter("other", peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=2, total_step=5,
                                                      inference_mode=True))  # fmt: skip
    with torch.no_grad():
        for model in (plain, fast):
            torch.manual_seed(1)
            for n, p in model.named_parameters():
                if "other" in n:
                    p.normal_()
    calls = _fused_calls(monkeypatch)
    for adapter in ("other", "default"):
        plain.set_adapter(adapter)
        fast.set_adapter(adapter)
        torch.testing.assert_close(_logits(fast), _logits(plain))
    assert calls and all(calls)
    for model in (plain, fast):
        model.base_model.set_adapter(["default", "other"])  # several active: PEFT's own forward sums them
    torch.testing.assert_close(_logits(fast), _logits(plain))
    for model in (plain, fast):
        model.set_adapter("default")
        model.delete_adapter("other")
    torch.testing.assert_close(_logits(fast), _logits(plain))


def test_rescale_and_disable_adapter():
    from peft.helpers import rescale_adapter_scale

    plain, fast = _pair()
    with rescale_adapter_scale(plain, 2.5), rescale_adapter_scale(fast, 2.5):
        torch.testing.assert_close(_logits(fast), _logits(plain))
        scaled = _logits(fast)
    assert not torch.allclose(scaled, _logits(fast))
    with plain.disable_adapter(), fast.disable_adapter():
        torch.testing.assert_close(_logits(fast), _logits(plain))
    torch.testing.assert_close(_logits(fast), _logits(plain))


def test_config_changes_before_training_are_read():
    plain, fast = _pair()
    for model in (plain, fast):
        cfg = model.peft_config["default"]
        cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT = 14, 3, 4, 3  # as a Trainer sets total_step
        model.base_model.rankallocator.set_total_step(14)
    _train([plain, fast], 17)
    assert fast.peft_config["default"].rank_pattern is not None


def test_peft_allocator_interface():
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    _train([plain, fast], 5)
    ours, theirs = fast.base_model.rankallocator, plain.base_model.rankallocator
    assert isinstance(ours, peft.tuners.adalora.RankAllocator)
    assert ours.peft_config is fast.peft_config["default"]
    assert (ours.init_bgt, ours.target_bgt, ours.name_set) == (theirs.init_bgt, theirs.target_bgt, theirs.name_set)
    assert ours.exp_avg_ipt.keys() == theirs.exp_avg_ipt.keys()
    for name in theirs.exp_avg_ipt:
        torch.testing.assert_close(ours.exp_avg_ipt[name], theirs.exp_avg_ipt[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(ours.exp_avg_unc[name], theirs.exp_avg_unc[name], rtol=1e-5, atol=1e-9)
    assert ours.budget_schedule(6) == theirs.budget_schedule(6)


def test_resize_then_regularise():
    plain, fast = _pair()
    _train([plain, fast], 10)  # through the final step: a rank pattern
    pattern = plain.peft_config["default"].rank_pattern
    for model in (plain, fast):
        model.base_model.resize_modules_by_rank_pattern(pattern, "default")
    b = batch(3)
    losses = [m(**b).loss for m in (plain, fast)]
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-5, atol=1e-6)


def test_torch_func_grad_runs_peft_s_forward(monkeypatch):
    """Under a torch.func transform the fused op cannot run (an autograd.Function without vmap rules): PEFT's own
    forward runs, so functional_call + grad gives PEFT's gradients."""
    from torch.func import functional_call, grad

    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    calls = _fused_calls(monkeypatch)
    ids = batch(0)["input_ids"]
    got = []
    for model in (plain, fast):
        model.eval()
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        got.append(grad(lambda p, m=model: functional_call(m, p, (), {"input_ids": ids, "labels": ids}).loss)(params))
    assert calls and not any(calls)
    for k, g in got[0].items():
        torch.testing.assert_close(got[1][k], g)


def test_hooks_on_the_base_layer_fire():
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    seen = {}
    for tag, model in (("plain", plain), ("fast", fast)):
        base = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
        base.register_forward_hook(lambda mod, args, out, tag=tag: seen.setdefault(tag, out.detach().clone()))
    torch.testing.assert_close(_logits(fast), _logits(plain))
    torch.testing.assert_close(seen["fast"], seen["plain"])


def test_reload_a_pruned_adapter_for_training(tmp_path):
    plain, fast = _pair()
    _train([plain, fast], 10)
    plain.save_pretrained(tmp_path)
    models = [peft.PeftModel.from_pretrained(gpt2(), tmp_path, is_trainable=True) for _ in range(2)]
    ak.accelerate_peft(models[1])
    torch.testing.assert_close(_logits(models[1]), _logits(models[0]))
    for model in models:
        cfg = model.peft_config["default"]
        cfg.total_step, cfg.tinit, cfg.tfinal = 8, 1, 2
    _train(models, 8)


def test_mixed_models_are_refused_with_what_to_use():
    mixed = peft.get_peft_model(llama(), peft.AdaLoraConfig(target_modules=["q_proj"], total_step=5),
                                mixed=True)  # fmt: skip
    with pytest.raises(TypeError, match=r"PeftMixedModel .* peft.get_peft_model"):
        ak.accelerate_peft(mixed)


def test_a_failed_accelerate_changes_nothing():
    plain, _ = _pair(llama, ["q_proj", "v_proj"])
    layer = plain.base_model.model.model.layers[1].self_attn.v_proj
    layer.lora_A["default"] = plain.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]  # shared
    with pytest.raises(ValueError, match="shares its storage"):
        ak.accelerate_peft(plain)
    assert type(layer) is peft.tuners.adalora.SVDLinear
    assert type(plain.base_model) is peft.tuners.adalora.AdaLoraModel
    assert type(plain.base_model.rankallocator) is peft.tuners.adalora.RankAllocator


def test_verbose_says_how_many_layers_are_fused(capsys):
    plain, _ = _pair(llama, ["q_proj", "v_proj"])
    ak.accelerate_peft(plain, verbose=True)
    assert "accelerate_peft: 4 of 4 AdaLoRA layers fused" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ import_peft


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_import_peft_sequence_classification_with_every_bias_mode(tmp_path, bias):
    def bert(seed=0):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, num_labels=3)  # fmt: skip
        return transformers.BertForSequenceClassification(cfg).eval()

    pm = peft.get_peft_model(bert(), peft.AdaLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS",
                                                        total_step=5, init_r=4, bias=bias))  # fmt: skip
    randomize_lams(pm)
    with torch.no_grad():  # trained biases and classifier head, as after fine-tuning
        for n, p in pm.named_parameters():
            if p.requires_grad and ("bias" in n or "classifier" in n):
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    plain = bert()
    names = import_peft(plain, tmp_path)
    assert len(names) == 4
    ids = batch()["input_ids"]
    pm.eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_load_adapter_then_set_adapter(tmp_path, monkeypatch):
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    source, _ = _pair(llama, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in source.named_parameters():
            if "lora_" in n:
                p.normal_()
    source.save_pretrained(tmp_path)
    for model in (plain, fast):
        model.load_adapter(tmp_path, adapter_name="loaded")
        model.set_adapter("loaded")
    calls = _fused_calls(monkeypatch)
    torch.testing.assert_close(_logits(fast), _logits(plain))
    assert calls and all(calls)  # the loaded adapter runs fused, its scaling read live
    torch.testing.assert_close(_logits(fast), _logits(source))


def test_pre_hooks_on_the_base_layer_are_honoured():
    """An offload-style pre-hook (accelerate's device_map hooks are pre-hooks) that changes the input: PEFT's
    forward runs for that layer, so the base layer sees what the hook gives it."""
    plain, fast = _pair(llama, ["q_proj", "v_proj"])
    for model in (plain, fast):
        base = model.base_model.model.model.layers[0].self_attn.v_proj.get_base_layer()
        base.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    torch.testing.assert_close(_logits(fast), _logits(plain))
