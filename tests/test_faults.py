"""Faults as users produce them: repeated steps under gradient accumulation, non-finite gradients, reduced
precision on every backend, interrupted saves, corrupt and mismatched checkpoints, bad arguments to the
op, the layer, the injection and the CLI. Each gives PEFT's result or one clear error, and leaves the model
and the files on disk as they were."""

import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from helpers import CPU, runnable_backends  # noqa: E402
from test_allocator import NAMES, assert_same, build_pair, fake_step  # noqa: E402

import adalora_kernels as ak  # noqa: E402
from adalora_kernels.integrations import export_peft, import_peft, load_adalora, save_adalora  # noqa: E402

SCHEDULE = {"init_r": 6, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 3, "deltaT": 2}


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()} | {
        f"{n}.requires_grad": torch.tensor(p.requires_grad) for n, p in model.named_parameters()
    }


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ allocator


@pytest.mark.parametrize("backend", runnable_backends(CPU))
def test_gradient_accumulation_repeats_steps_as_peft_and_keeps_the_final_pattern(backend):
    """update_and_allocate once per micro-batch: PEFT's result in the budgeting phase (EMAs updated per call),
    and at the final step, where PEFT raises, the frozen pattern stays instead of every rank being pruned."""
    pm, ours, alloc = build_pair(**SCHEDULE, backend=backend)
    gen = torch.Generator().manual_seed(3)
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in range(final):
        fake_step(pm, ours, gen)
        for _ in range(2):  # two micro-batches, the same step
            pm.base_model.update_and_allocate(step)
            alloc.update_and_allocate(step)
        assert_same(pm, ours, alloc, step)
    fake_step(pm, ours, gen)
    pm.base_model.update_and_allocate(final)
    alloc.update_and_allocate(final)
    assert_same(pm, ours, alloc, final)
    with pytest.raises(KeyError):  # PEFT: its EMAs were reset at the final step
        pm.base_model.update_and_allocate(final)
    kept = sum(map(sum, alloc.rank_pattern.values()))
    alloc.update_and_allocate(final)  # ours: the pattern stands
    assert sum(map(sum, alloc.rank_pattern.values())) == kept == SCHEDULE["target_r"] * len(NAMES)
    assert all(int((getattr(ours, n).lam != 0).sum()) == sum(alloc.rank_pattern[n]) for n in NAMES)


@pytest.mark.parametrize("backend", runnable_backends(CPU))
def test_non_finite_gradients_mask_as_peft(backend):
    """One step with inf/NaN gradients (an fp16 overflow): PEFT keeps what compares False to the threshold."""
    pm, ours, alloc = build_pair(**SCHEDULE, backend=backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(SCHEDULE["total_step"] - SCHEDULE["tfinal"]):
        fake_step(pm, ours, gen)
        if step == 4:
            for n, value in (("a", float("nan")), ("c", float("inf"))):
                svd, layer = getattr(pm.base_model.model, n), getattr(ours, n)
                svd.lora_A["default"].grad[1] = value
                layer.Q.grad[1] = value
        pm.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        if step >= 4:
            assert_same(pm, ours, alloc, step)


def test_steps_back_before_the_final_step_score_again_as_peft():
    pm, ours, alloc = build_pair(**SCHEDULE)
    gen = torch.Generator().manual_seed(7)
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in [*range(final + 2), 4]:  # through the final phase, then back to step 4
        fake_step(pm, ours, gen)
        pm.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
    assert_same(pm, ours, alloc, "back to 4")
    assert all(bool(getattr(ours, n).rank_mask.all()) for n in NAMES)  # λ masks again, as PEFT


def test_step_must_be_a_non_negative_int():
    _, _, alloc = build_pair(**SCHEDULE)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="global_step: expected an int >= 0"):
            alloc.update_and_allocate(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_adapters_on_every_backend(dtype):
    """16-bit adapters (a model cast with .bfloat16()): every backend scores them, and as the torch backend."""
    results = {}
    for backend in runnable_backends(CPU):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
        ak.inject_adalora(model, ["0", "1"], init_r=4, backend=backend)
        model.to(dtype)
        alloc = ak.RankAllocator(model, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, backend=backend)
        gen = torch.Generator().manual_seed(1)
        for step in range(7):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                    with torch.no_grad():
                        p.sub_(0.01 * p.grad)
            alloc.update_and_allocate(step)
        results[backend] = (alloc.rank_pattern, [m.lam.clone() for m in model if isinstance(m, ak.AdaLoRALinear)])
    pattern, lams = results["torch"]
    assert sum(map(sum, pattern.values())) == 4
    for backend, (other_pattern, other_lams) in results.items():
        assert other_pattern == pattern, backend
        assert all(torch.equal(a, b) for a, b in zip(lams, other_lams)), backend


# ------------------------------------------------------------------------------------------ checkpoints


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    ak.inject_adalora(m, ["0", "2"], init_r=4)
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lam.normal_()
    return m


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_adalora(_model(0), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dumps", fail)  # the weights are written, the config is not
    with pytest.raises(OSError, match="No space left"):
        save_adalora(_model(1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary folder left either
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")] == []


def test_a_failed_save_into_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(OSError, match="No space left"):
        save_adalora(_model(0), tmp_path / "runs" / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _weights(folder):
    """The weights file of a checkpoint folder (named by its digest)."""
    (path,) = folder.glob("adalora-*.safetensors")
    return path


def test_a_config_from_another_save_is_refused(tmp_path):
    save_adalora(_model(0), tmp_path / "a")
    save_adalora(_model(1), tmp_path / "b")
    _weights(tmp_path / "a").write_bytes(_weights(tmp_path / "b").read_bytes())
    fresh = _model(2)
    state = _state(fresh)
    with pytest.raises(ValueError, match="is not the file its config was saved with"):
        load_adalora(fresh, tmp_path / "a")
    assert _same_state(state, _state(fresh))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adalora_config.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: _weights(d).write_bytes(b"garbage"), "is not the file its config"),
        (lambda d: _weights(d).unlink(), r"has no adalora-\w+\.safetensors"),
        (lambda d: (d / "adalora_config.json").unlink(), "has no adalora_config.json"),
    ],
)
def test_corrupt_checkpoints_fail_cleanly(tmp_path, damage, message):
    save_adalora(_model(0), tmp_path)
    damage(tmp_path)
    fresh = _model(1)
    state = _state(fresh)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adalora(fresh, tmp_path)
    assert _same_state(state, _state(fresh))


def test_a_mismatched_checkpoint_names_the_layer_and_tensor_and_changes_nothing(tmp_path):
    save_adalora(_model(0), tmp_path)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))  # the last layer does not fit
    state = _state(plain)
    with pytest.raises(ValueError, match=r"2\.P: the checkpoint's shape \(6, 4\) does not fit the layer \(7, 4\)"):
        load_adalora(plain, tmp_path)
    assert _same_state(state, _state(plain))  # layer 0 was not injected, nothing was frozen
    assert not any(isinstance(m, ak.AdaLoRALinear) for m in plain.modules())
    missing = nn.Sequential(nn.Linear(12, 10))
    with pytest.raises(ValueError, match="2: the checkpoint has this layer, the model has no module"):
        load_adalora(missing, tmp_path)


def test_import_peft_is_all_or_nothing(tmp_path):
    export_peft(_model(0), tmp_path)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))
    state = _state(plain)
    with pytest.raises(ValueError, match=r"2\.lora_B: the checkpoint's shape \(6, 4\) does not fit the layer \(7, 4\)"):
        import_peft(plain, tmp_path)
    assert _same_state(state, _state(plain))
    assert not any(isinstance(m, ak.AdaLoRALinear) for m in plain.modules())


# ------------------------------------------------------------------------------------------ layer and op


def test_bad_hyper_parameters_freeze_nothing():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"lora_dropout: expected a float in \[0, 1\), got 2"):
        ak.AdaLoRALinear.from_linear(lin, lora_dropout=2)
    assert lin.weight.requires_grad and lin.bias.requires_grad
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for kwargs, message in (({"init_r": -1}, "init_r: expected an int >= 0"),
                            ({"lora_alpha": float("nan")}, "lora_alpha: expected a finite number")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ak.inject_adalora(model, ["0"], **kwargs)
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["weight", "P", "lam", "Q", "x"])
def test_none_for_a_tensor_argument_is_named(name):
    args = {"x": torch.randn(2, 4), "weight": torch.randn(3, 4), "P": torch.randn(3, 2), "lam": torch.randn(2),
            "Q": torch.randn(2, 4)}  # fmt: skip
    args[name] = None
    with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got NoneType"):
        ak.adalora_linear(args["x"], args["weight"], None, args["P"], args["lam"], args["Q"], scaling=1.0)


@pytest.mark.parametrize("backend", runnable_backends(CPU))
@pytest.mark.parametrize(("in_f", "out_f"), [(0, 3), (4, 0)])
def test_empty_features_behave_as_nn_linear(backend, in_f, out_f):
    if backend == "triton" and 0 in (in_f, out_f):
        pytest.skip("Triton has no zero-size tiles")
    lin = nn.Linear(in_f, out_f)
    layer = ak.AdaLoRALinear.from_linear(lin, init_r=2, backend=backend)
    x = torch.randn(5, in_f, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, lin(x))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_meta_tensors_give_shapes():
    args = [torch.empty(*s, device="meta") for s in ((2, 7, 4), (3, 4), (3, 2), (2,), (2, 4))]
    y = ak.adalora_linear(args[0], args[1], None, *args[2:], scaling=1.0, dropout_p=0.1)
    assert y.shape == (2, 7, 3) and y.device.type == "meta"


def test_compile_dynamic_fullgraph():
    layer = ak.AdaLoRALinear.from_linear(nn.Linear(8, 6), init_r=3, backend="torch")
    with torch.no_grad():
        layer.lam.normal_()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for rows in (5, 9):
        x = torch.randn(rows, 8)
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_bfloat16_is_refused_by_the_triton_interpreter():
    from adalora_kernels.kernels.triton.config import INTERPRET

    if not INTERPRET:
        pytest.skip("only the interpreter computes bf16 tl.dot wrongly")
    x, w, P, lam, Q = (torch.randn(*s, dtype=torch.bfloat16) for s in ((4, 16), (8, 16), (8, 2), (2,), (2, 16)))
    with pytest.raises(TypeError, match="bfloat16 on the Triton interpreter"):
        ak.adalora_linear(x, w, None, P, lam, Q, scaling=1.0, backend="triton")


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--rounds", "0"], "--rounds: expected a positive int, got '0'"),
        (["bench", "--tokens", "-3"], "--tokens: expected a positive int, got '-3'"),
        (["bench", "--tokens", "0"], "--tokens: expected a positive int, got '0'"),
        (["bench", "--dropout", "1"], "--dropout: expected a rate in [0, 1), got '1'"),
        (["memory", "--prune-to", "nan"], "--prune-to: expected a fraction in (0, 1], got 'nan'"),
        (["train", "--lr", "nan"], "--lr: expected a positive finite float, got 'nan'"),
        (["train", "--orth-reg-weight", "-1"], "--orth-reg-weight: expected a finite float >= 0, got '-1'"),
        (["train", "--target-r", "9"], "--target-r: expected 0 <= target_r <= init_r (8), got 9"),
        (["bench", "--json", "/nonexistent/out.json"], "--json: folder /nonexistent does not exist"),
        (["memory", "--csv", "/"], "--csv: / is a folder, expected a file path"),
        (["ledger", "--json", "/proc/ak.json"], "--json: /proc/ak.json is not writable"),  # root passes os.access
        (["bench", "--plot", "out.xyz"], "--plot: unknown plot format 'xyz'"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    from adalora_kernels import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_cli_unwritable_output_fails_before_the_run(tmp_path, monkeypatch, capsys):
    from adalora_kernels import cli

    def refuse(*args, **kwargs):  # as a read-only mount does, whatever os.access says to root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "open", refuse, raising=False)
    monkeypatch.setattr(cli, "run_bench", lambda args: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", "--json", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert f"--json: {tmp_path / 'r.json'} is not writable" in capsys.readouterr().err


def test_cli_mistake_from_the_shell_has_no_traceback(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "adalora_kernels", "train", "--lr", "nan"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "adalora-kernels train: error: argument --lr: expected a positive finite float, got 'nan'"
    ]
    out = subprocess.run([sys.executable, "-m", "adalora_kernels", "export-lora", "missing", "out"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [  # before peft (and bitsandbytes' log) load
        "adalora-kernels export-lora: path: missing has no adapter_config.json (a PEFT adapter)"
    ]


def test_dropout_under_cuda_graph_capture_needs_an_explicit_seed(monkeypatch):
    """A seed drawn on the host during capture would give every replay of the graph one dropout mask: refused,
    naming the way out; with seed= given, or without dropout, the call goes on."""
    import sys

    monkeypatch.setattr(sys.modules["adalora_kernels.ops.adalora_linear"], "_capturing", lambda device: True)
    layer = ak.AdaLoRALinear(8, 6, init_r=2, lora_dropout=0.1, backend="torch")
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"CUDA graph capture.*pass seed="):
        layer(x)
    w, b, P, lam, Q = layer.weight, layer.bias, layer.P, layer.lam, layer.Q
    ak.adalora_linear(x, w, b, P, lam, Q, scaling=0.5, dropout_p=0.1, seed=3, backend="torch")
    layer.eval()
    layer(x)
