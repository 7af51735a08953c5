"""``adalora-kernels bench|memory``: parsing, bad input, a tiny real run, and the DESIGN §5 JSON schema."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

from adalora_kernels import benchmarking as bm
from adalora_kernels.cli import main, make_parser

OPS = {"fwd", "bwd", "fwd_bwd", "allocator_step", "orth_reg", "saved_bytes", "peak_bytes", "resident_bytes"}
VARIANTS = {"linear", "peft", "peft_compiled", "torch", "triton", "triton_split", "csrc"}
REQUIRED = {"op", "variant", "tokens", "in", "out", "r", "dtype", "dropout"}


def check_schema(path):
    data = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "rows"):
        assert key in data, key
    assert data["rows"]
    for row in data["rows"]:
        assert set(row) >= REQUIRED, row
        assert row["op"] in OPS and row["variant"] in VARIANTS, row
        assert ("ms" in row) or ("bytes" in row) or ("unavailable" in row), row
    return data


def test_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "adalora_kernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "memory" in out.stdout
    sub = subprocess.run([sys.executable, "-m", "adalora_kernels", "bench", "--help"], capture_output=True, text=True)
    assert "--shape" in sub.stdout and "--preset" in sub.stdout and "--quick" in sub.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--preset", "gpt-9"], "unknown preset 'gpt-9'; valid: cpu-small, llama-7b, llama3-8b, llama-70b"),
        (["bench", "--variants", "nope"], "unknown variant 'nope'; valid: linear, peft, peft_compiled, torch"),
        (["bench", "--dtype", "int8"], "unknown dtype 'int8'; valid: float32, float16, bfloat16, float64"),
        (["bench", "--device", "tpu"], "unknown device 'tpu'; valid: cpu, cuda, cuda:N"),
        (["memory", "--shape", "1,2"], "--shape: expected tokens,in,out"),
        (["bench", "--modes", "sideways"], "unknown mode 'sideways'; valid: fwd, bwd, fwd_bwd"),
    ],
)
def test_bad_arguments_list_the_valid_ones(argv, message, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_asked_without_cuda(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["bench", "--device", "cuda"])
    assert "torch sees no CUDA device; valid here: cpu" in capsys.readouterr().err


def test_shape_that_cannot_fit_is_refused_before_allocating(capsys):
    assert main(["bench", "--shape", "10000000,100000,100000", "--no-allocator"]) == 2
    assert "choose a smaller --tokens or preset" in capsys.readouterr().err


def test_tiny_bench_run_writes_json_csv_plot(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--shape", "64,32,48", "--rank", "4", "--dropout", "0", "0.1", "--rounds", "2", "--no-allocator",
            "--json", str(out), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")]  # fmt: skip
    assert main(argv) == 0
    data = check_schema(out)
    rows = [r for r in data["rows"] if r["op"] == "fwd_bwd" and "ms" in r]
    assert {r["variant"] for r in rows} >= {"linear", "peft", "peft_compiled", "torch"}
    for r in rows:
        assert r["ms"] > 0 and r["slowdown_vs_linear"] > 0
    assert {r["op"] for r in data["rows"]} == {"fwd", "bwd", "fwd_bwd"}
    overhead = [r for r in rows if r.get("host_overhead")]  # the per-call cost at a tiny shape
    assert {(r["tokens"], r["in"], r["out"]) for r in overhead} == {(8, 16, 16)}
    assert {r["variant"] for r in overhead} >= {"linear", "peft", "torch"} and "peft_compiled" not in str(overhead)
    assert all(r["us"] > 0 and "overhead_us" in r for r in overhead)
    ops = {(r["variant"], r["dropout"]): r["ops_per_call"] for r in overhead}  # dispatched ops, views aside
    assert ops[("linear", 0.0)] == 2  # addmm forward, mm for dx backward
    assert ops.get(("csrc", 0.0), 6) <= 6 < ops[("torch", 0.0)]  # one native op each way, λ's scaling around
    header = (tmp_path / "b.csv").read_text().splitlines()[0].split(",")  # CUDA adds auto's columns
    assert (tmp_path / "b.png").stat().st_size > 1000 and "dropout" in header
    assert all("unavailable" in r for r in data["rows"] if r["variant"].startswith("triton") and "ms" not in r)


def test_allocator_rows(tmp_path):
    out = tmp_path / "a.json"
    assert (
        main(["bench", "--quick", "--modes", "fwd", "--variants", "linear", "--dropout", "0", "--json", str(out)]) == 0
    )
    rows = {(r["op"], r["variant"]): r for r in check_schema(out)["rows"]}
    assert rows[("allocator_step", "torch")]["speedup_vs_peft"] > 0 and rows[("orth_reg", "torch")]["ms"] > 0


def test_tiny_memory_run(tmp_path):
    out = tmp_path / "m.json"
    argv = ["memory", "--shape", "128,64,64", "--rank", "4", "16", "--dropout", "0", "0.1", "--no-block",
            "--json", str(out), "--plot", str(tmp_path / "m.png")]  # fmt: skip
    assert main(argv) == 0
    rows = check_schema(out)["rows"]
    ours = [r for r in rows if r["variant"] == "torch" and r["dropout"] == 0.1 and r["op"] == "saved_bytes"]
    assert ours and all(r["peft_over_ours_beyond_x"] >= 5 for r in ours)  # the memory target, measured
    assert {r["budget_r"] for r in rows if r["r"] == 16} == {16, 4}  # a pruned budget too


def test_interleaved_rounds_rotate_and_the_cpu_heap_is_recorded():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    bm.time_calls(fns, rounds=3, device=torch.device("cpu"))
    # one warm-up round, then three; each starts one variant later, so none always follows another
    assert calls == list("abcbcacababc")
    env = bm.environment(torch.device("cpu"))
    assert "cpu_heap" in env and env["cpu_heap"] == bm.steady_cpu_heap()


def test_ledger_prints_and_writes_every_route(tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["ledger", "--shape", "8192,4096,4096", "--rank", "16", "--dropout", "0.1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    totals = {r["variant"]: r for r in data["rows"] if r["op"] == "ledger_total"}
    assert set(totals) == {"linear", "peft", "torch", "triton", "triton_split", "csrc"}
    assert all(r["predicted_us"] > 0 and r["bytes_read"] >= 0 for r in data["rows"] if r["op"] == "ledger")
    assert "triton_split  predicted" in capsys.readouterr().out
    ceilings = tmp_path / "c.json"
    ceilings.write_text(json.dumps({"copy_gbps": 2150.0}))  # half the bandwidth: the passes take twice as long
    assert main(["ledger", "--routes", "triton_split", "--ceilings", str(ceilings), "--json", str(out)]) == 0
    slower = {r["kernel"]: r["predicted_us"] for r in json.loads(out.read_text())["rows"] if r["op"] == "ledger"}
    faster = {
        r["kernel"]: r["predicted_us"] for r in data["rows"] if r["op"] == "ledger" and r["variant"] == "triton_split"
    }
    assert slower["_split_x_bwd_kernel"] > 1.8 * (faster["_split_x_bwd_kernel"] - 2)
    # as under torch.use_deterministic_algorithms(True): partials and their dt finalize instead of atomics
    assert main(["ledger", "--routes", "triton_split", "--dropout", "0.1", "--deterministic", "--json", str(out)]) == 0
    fixed = json.loads(out.read_text())["rows"]
    assert "_split_dt_finalize_kernel" in {r.get("kernel") for r in fixed} - set(faster)
    assert fixed[-1]["deterministic"] and fixed[-1]["predicted_ms"] > totals["triton_split"]["predicted_ms"]
    ceilings.write_text("{not json")
    with pytest.raises(SystemExit):
        main(["ledger", "--ceilings", str(ceilings)])
    assert "--ceilings:" in capsys.readouterr().err


def test_bench_model_steps_a_whole_model_and_ours_starts_from_peft_s_loss(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    argv = ["bench-model", "--quick", "--device", "cpu", "--layers", "1", "--rounds", "2", "--warmup", "1",
            "--dropout", "0", "--variants", "frozen", "peft", "ours", "ours_fused", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"frozen", "peft", "ours", "ours_fused"} and data["commit"] and data["device"]
    for row in rows.values():
        assert row["op"] == "model_step" and row["layers"] == 1 and row["tokens"] == 256 and row["ms"] > 0
        assert row["p20_ms"] <= row["ms"] <= row["p80_ms"]
    assert rows["frozen"]["slowdown_vs_frozen"] == 1.0 and rows["peft"]["speedup_vs_peft"] == 1.0
    assert rows["ours"]["slowdown_vs_frozen"] == pytest.approx(rows["ours"]["ms"] / rows["frozen"]["ms"])
    # the same model, adapters and inputs: PEFT's loss (with its regulariser) and ours agree; the frozen one differs
    assert rows["ours"]["first_loss"] == pytest.approx(rows["peft"]["first_loss"], rel=1e-6)
    assert rows["ours_fused"]["first_loss"] == pytest.approx(rows["peft"]["first_loss"], rel=1e-5)
    assert rows["frozen"]["first_loss"] != pytest.approx(rows["peft"]["first_loss"], rel=1e-3)
    assert "bench-model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench-model", "--hidden", "130", "--heads", "4"], "--heads: expected a divisor of hidden = 130, got 4"),
        (["bench-model", "--tokens", "100", "--seq", "64"], "--tokens: expected a multiple of seq = 64, got 100"),
        (["bench-model", "--variants", "tpu"], "unknown variant 'tpu'; valid: frozen, peft, peft_compiled, ours"),
    ],
)
def test_bench_model_refuses_shapes_it_cannot_build(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
