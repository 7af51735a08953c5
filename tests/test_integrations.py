"""inject_adalora, accelerate_peft, checkpoints and the Trainer callback, on models built from configs."""

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import export_peft, import_peft, load_adalora, save_adalora  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def batch(seed=0, n=4, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def randomize_lams(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lam") or "lora_E" in name:
                p.normal_()


# ------------------------------------------------------------------------------------------------ inject


@pytest.mark.parametrize("factory,targets", [(llama, LLAMA_TARGETS), (gpt2, GPT2_TARGETS)])
def test_inject_shares_weights_freezes_and_keeps_outputs(factory, targets):
    model, reference = factory(), factory()
    ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if n.split(".")[-1] in targets}
    names = ak.inject_adalora(model, targets, init_r=4, lora_alpha=8)
    assert sorted(names) == sorted(ptrs) and len(names) == (8 if factory is gpt2 else 14)  # 2 blocks
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, ak.AdaLoRALinear) and layer.weight.data_ptr() == ptrs[name]
        assert layer.fan_in_fan_out == (factory is gpt2)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"P", "lam", "Q"}
    ids = batch()["input_ids"]
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)  # lam = 0 at init


def test_inject_gpt2_matches_peft():
    """GPT-2's Conv1D (weight stored (in, out)): ours equals PEFT's fan_in_fan_out SVDLinear, logits and grads."""
    base = gpt2()
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=GPT2_TARGETS, lora_alpha=16)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize_lams(pm)
    ours = copy.deepcopy(base)
    ak.inject_adalora(ours, GPT2_TARGETS, init_r=4, lora_alpha=16)
    for name, layer in ours.named_modules():
        if isinstance(layer, ak.AdaLoRALinear):
            svd = pm.base_model.model.get_submodule(name)
            with torch.no_grad():
                layer.P.copy_(svd.lora_B["default"]), layer.lam.copy_(svd.lora_E["default"].view(-1))
                layer.Q.copy_(svd.lora_A["default"])
    b = batch()
    out_peft, out_ours = pm(**b), ours(**b)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, rtol=1e-5, atol=1e-5)
    out_peft.loss.backward(), out_ours.loss.backward()
    svd = pm.base_model.model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(
        ours.transformer.h[0].attn.c_attn.Q.grad, svd.lora_A["default"].grad, rtol=1e-4, atol=1e-6
    )


def test_inject_errors_and_regex():
    model = llama()
    with pytest.raises(ValueError, match=r"'q_prj' matches no module of LlamaForCausalLM; near matches: \['q_proj'"):
        ak.inject_adalora(model, ["q_prj"])
    with pytest.raises(
        TypeError, match=r"model.embed_tokens is a Embedding; only nn.Linear, transformers' Conv1D and bitsandbytes"
    ):
        ak.inject_adalora(model, ["embed_tokens"])
    with pytest.raises(TypeError, match="target_modules: expected a regex string or a list"):
        ak.inject_adalora(model, 3)
    names = ak.inject_adalora(model, r"model\.layers\.0\.self_attn\.(q|v)_proj", init_r=2)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match="already an AdaLoRALinear"):
        ak.inject_adalora(model, ["q_proj"])
    # nn.MultiheadAttention reads out_proj.weight itself: an adapter there would never run
    encoder = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(TypeError, match=r"self_attn\.out_proj is the output projection of an nn\.MultiheadAttention"):
        ak.inject_adalora(encoder, ["out_proj", "linear1"])
    assert all(p.requires_grad for p in encoder.parameters())  # refused before anything changed
    assert ak.inject_adalora(encoder, ["linear1", "linear2"]) == ["linear1", "linear2"]


# ------------------------------------------------------------------------------------------------ accelerate_peft


def _peft_pair(factory, targets, numerics="auto", **cfg):
    model = peft.get_peft_model(factory(), peft.AdaLoraConfig(target_modules=targets, task_type="CAUSAL_LM", **cfg))
    randomize_lams(model)
    return model, ak.accelerate_peft(copy.deepcopy(model), numerics=numerics)


@pytest.mark.parametrize("numerics", ["peft", "fused"])
@pytest.mark.parametrize("factory,targets", [(llama, LLAMA_TARGETS), (gpt2, GPT2_TARGETS)])
def test_accelerated_peft_trains_like_peft(factory, targets, numerics):
    total = 12
    plain, fast = _peft_pair(factory, targets, numerics, init_r=6, target_r=2, total_step=total, tinit=2, tfinal=3,
                             deltaT=2, lora_alpha=8, orth_reg_weight=0.3)  # fmt: skip
    assert type(fast.base_model.model.get_submodule(_first_svd(fast))).__name__ == "FusedSVDLinear"
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, fast)]
    for step in range(total + 3):  # warm-up, budgeting, final phase, past total_step
        b = batch(step)
        losses = []
        for model, opt in zip((plain, fast), opts):
            model.train()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=2e-5), f"step {step}"
        assert fast.peft_config["default"].rank_pattern == plain.peft_config["default"].rank_pattern, f"step {step}"
    for (n, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
        if "lora_E" in n:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
            assert torch.equal(q == 0, p == 0), n  # the same ranks pruned


def _first_svd(model):
    return next(n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)


@pytest.mark.parametrize("numerics", ["peft", "fused"])
def test_accelerated_peft_keeps_save_pretrained_and_uses_our_op(tmp_path, monkeypatch, numerics):
    plain, fast = _peft_pair(llama, ["q_proj", "v_proj"], numerics, init_r=4, target_r=2, total_step=10)
    calls = []
    # the kernels' entry points: _forward_impl (custom op and eager autograd.Function), or csrc's one native op;
    # with PEFT's rounding, the forward is PEFT's ATen calls and the backward the kernels' (_backward_impl)
    op_module = sys.modules["adalora_kernels.ops.adalora_linear"]
    entry = "_backward_impl" if numerics == "peft" else "_forward_impl"
    real = getattr(op_module, entry)
    monkeypatch.setattr(op_module, entry, lambda *a: calls.append(1) or real(*a))
    csrc = sys.modules.get("adalora_kernels.kernels.csrc")
    if csrc is not None:
        real_call = csrc.layer_call
        monkeypatch.setattr(csrc, "layer_call", lambda *a: calls.append(1) or real_call(*a))
    ids = batch()["input_ids"]  # no labels: PEFT's own forward fails on labels for a model loaded for inference
    logits = fast(input_ids=ids).logits
    if numerics == "peft":
        assert torch.equal(logits, plain(input_ids=ids).logits)
        logits.sum().backward()
    assert len(calls) == 4  # 2 layers × q, v
    fast.peft_config["default"].rank_pattern = None
    fast.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


def test_unaccelerable_layers_stay_peft_with_one_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 4, 3), nn.Linear(4, 4)

    pm = peft.get_peft_model(
        Net(), peft.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["conv", "lin"])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ak.accelerate_peft(pm)
    msgs = [str(w.message) for w in caught if "accelerate_peft" in str(w.message)]
    assert len(msgs) == 1 and "conv (SVDConv2d over Conv2d)" in msgs[0]
    assert type(pm.base_model.model.lin).__name__ == "FusedSVDLinear"
    with pytest.raises(TypeError, match="peft_model: expected a PEFT model with an AdaLoRA adapter"):
        ak.accelerate_peft(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ checkpoints


def _trained_injected(factory=llama, targets=("q_proj", "v_proj", "down_proj")):
    model = factory()
    ak.inject_adalora(model, list(targets), init_r=4, lora_alpha=8)
    randomize_lams(model)
    with torch.no_grad():
        for i, layer in enumerate(m for m in model.modules() if isinstance(m, ak.AdaLoRALinear)):
            layer.rank_mask[(i % 3)] = False  # a rank pattern, as after the final phase
            layer.rank_mask[3] = i % 2 == 0
    return model


@pytest.mark.parametrize("resize", [False, True])
def test_save_load_round_trip(tmp_path, resize):
    model = _trained_injected()
    ids = batch()["input_ids"]
    expected = model(ids).logits
    save_adalora(model, tmp_path, resize=resize)
    fresh = llama()  # plain model: load injects the layers
    load_adalora(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected)
    layer, original = fresh.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert layer.r == (int(original.rank_mask.sum()) if resize else 4) and layer.init_r == 4


@pytest.mark.parametrize("factory,targets", [(llama, ("q_proj", "v_proj", "down_proj")), (gpt2, ("c_attn", "c_fc"))])
def test_export_to_plain_peft_and_import_back(tmp_path, factory, targets):
    model = _trained_injected(factory, targets)
    ids = batch()["input_ids"]
    expected = model(ids).logits
    export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(), tmp_path)  # plain PEFT, offline
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    back = factory()
    import_peft(back, tmp_path)
    torch.testing.assert_close(back(ids).logits, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Trainer


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = batch(i, n=1)["input_ids"][0]
        return {"input_ids": ids, "labels": ids}


def _train(model, tmp_path, callback, steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback])
    trainer.train()
    return trainer


def test_trainer_callback_with_injected_model(tmp_path):
    model = llama()
    ak.inject_adalora(model, ["q_proj", "v_proj"], init_r=4)
    callback = ak.AdaLoRACallback(target_r=2, tinit=1, tfinal=2)
    trainer = _train(model, tmp_path, callback)
    allocator = callback.allocator
    assert allocator.total_step == 6  # from max_steps
    assert allocator.rank_pattern is not None and all(sum(v) <= 4 for v in allocator.rank_pattern.values())
    budgets = [log["adalora_budget"] for log in trainer.state.log_history if "adalora_budget" in log]
    assert budgets[0] == 16 and budgets[-1] == 8  # warm-up: 4 ranks × 4 layers; then the target: 2 × 4
    # an allocator of the model attached to an optimizer as well: two allocator steps per training step, refused
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ak.RankAllocator(model, target_r=2, total_step=6, tinit=1, tfinal=2).attach(opt)
    with pytest.raises(RuntimeError, match=r"AdaLoRACallback: a RankAllocator of this model is attached"):
        _train(model, tmp_path, ak.AdaLoRACallback(target_r=2, tinit=1, tfinal=2))


def test_trainer_callback_with_peft_model_steps_in_order(tmp_path):
    pm = peft.get_peft_model(llama(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2,
                                                         target_modules=["q_proj", "v_proj"]))  # fmt: skip
    fast = ak.accelerate_peft(pm)
    steps = []
    update = fast.base_model.update_and_allocate

    def spy(step):
        assert any(p.grad is not None for p in fast.parameters() if p.requires_grad)  # before zero_grad
        steps.append(step)
        return update(step)

    fast.base_model.update_and_allocate = spy
    _train(fast, tmp_path, ak.AdaLoRACallback())
    assert steps == list(range(6))
    assert fast.peft_config["default"].rank_pattern is not None
    # attached to an optimizer as well, the callback would give two allocator steps per training step: refused
    opt = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.1)
    fast.base_model.attach(opt)
    with pytest.raises(RuntimeError, match=r"AdaLoRACallback: the model's allocator is attached to an optimizer"):
        _train(fast, tmp_path, ak.AdaLoRACallback())
    assert steps == list(range(6))
