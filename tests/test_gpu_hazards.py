"""The GPU hazards that a CPU can show: int64 offsets, the float64 dropout scale, determinism without atomics,
TF32 only where torch allows it, the autotune prune, auto's measured choice, and (in a subprocess, without the
interpreter) the compiled kernels themselves: no specialisation on M or the seed, no 16-bit spills."""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton
import triton.language as tl
from helpers import DEVICE, make_inputs

from adalora_kernels.kernels import unavailable_reason
from adalora_kernels.kernels.triton.adalora_linear import _offsets
from adalora_kernels.ops import backend as backend_mod

ROOT = Path(__file__).resolve().parent.parent
TRITON_RUNS = unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here (no CUDA, no TRITON_INTERPRET)")


# ------------------------------------------------------------------------------------------ auto's choice


def test_auto_measures_once_and_keeps_the_fastest():
    backend_mod.clear_auto_choices()
    calls = []

    def timer(name):
        calls.append(name)
        return {"triton": 2.0, "csrc": 1.5, "torch": 3.0}[name]

    key = ("cuda:0", 8192, 4096, 4096, 16, "bfloat16", True, False)
    assert backend_mod.measured_choice(key, ["triton", "csrc", "torch"], timer) == "csrc"
    assert backend_mod.measured_choice(key, ["triton", "csrc", "torch"], timer) == "csrc"
    assert calls == ["triton", "csrc", "torch"]  # timed once per key, cached for the process
    other = (*key[:-1], True)
    assert (
        backend_mod.measured_choice(other, ["triton", "torch"], lambda n: {"triton": 1.0, "torch": 2.0}[n]) == "triton"
    )
    assert backend_mod.auto_choices()[key] == ("csrc", {"triton": 2.0, "csrc": 1.5, "torch": 3.0})
    backend_mod.clear_auto_choices()


def test_auto_skips_a_backend_that_fails_to_run():
    backend_mod.clear_auto_choices()

    def timer(name):
        if name == "triton":
            raise RuntimeError("out of resources")
        return 1.0

    assert backend_mod.measured_choice(("k",), ["triton", "torch"], timer) == "torch"
    assert backend_mod.measured_choice(("j",), ["triton"], timer) == "triton"  # none timed: the first
    backend_mod.clear_auto_choices()


def test_auto_never_times_a_backend_on_a_rank_it_rejects():
    """auto's candidates are filtered by each backend's ``shape_reason`` (adalora_linear._shape_reason): the split
    route's rank limit leaves it out above ``SPLIT_MAX_R``; the csrc kernels (CPU and CUDA, the CUDA ones since
    the split route) have no rank limit, so no rank leaves them out."""
    import importlib

    from adalora_kernels.kernels.triton.config import SPLIT_MAX_R

    op = importlib.import_module("adalora_kernels.ops.adalora_linear")  # the module, not the function
    cpu = torch.device("cpu")
    if unavailable_reason("triton_split", cpu) is None:
        assert op._shape_reason("triton_split", cpu, SPLIT_MAX_R) is None
        reason = op._shape_reason("triton_split", cpu, SPLIT_MAX_R + 1)
        assert f"r <= {SPLIT_MAX_R}, got r = {SPLIT_MAX_R + 1}" in reason
    if unavailable_reason("csrc", cpu) is None:
        from adalora_kernels.kernels import csrc

        assert not hasattr(csrc, "shape_reason") and op._shape_reason("csrc", cpu, 4096) is None
    assert op._shape_reason("torch", cpu, 4096) is None


def test_auto_key_buckets_tokens_and_names_the_case():
    from adalora_kernels.ops.adalora_linear import auto_key

    w, lam = torch.empty(24, 40), torch.empty(4)
    k1 = auto_key(torch.empty(3, 600, 40), w, None, lam, 0.1)
    k2 = auto_key(torch.empty(2048, 40), w, None, lam, 0.1)
    assert k1 == k2 == ("cpu", 2048, 40, 24, 4, "float32", True, False)
    assert auto_key(torch.empty(2049, 40), w, torch.empty(24), lam, 0.0)[1:] == (
        4096,
        40,
        24,
        4,
        "float32",
        False,
        True,
    )


def test_an_explicit_backend_is_never_measured(monkeypatch):
    monkeypatch.setenv(backend_mod.ENV_VAR, "torch")
    assert backend_mod.requested(None) == "torch"
    assert backend_mod.requested("csrc") == "csrc"
    monkeypatch.delenv(backend_mod.ENV_VAR)
    assert backend_mod.requested(None) == "auto"


# ------------------------------------------------------------------------------------------ kernels (CPU)


@triton.jit
def _offsets_kernel(out_ptr, row0, stride_rows):
    rows = row0 + tl.arange(0, 4)  # int32 indices, as the kernels' aranges
    offs = _offsets(rows, tl.arange(0, 4), stride_rows, 1)
    tl.store(out_ptr + tl.arange(0, 4)[:, None] * 4 + tl.arange(0, 4)[None, :], offs)


@needs_triton
def test_tile_offsets_are_int64_past_2_31():
    out = torch.empty(4, 4, dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    _offsets_kernel[(1,)](out, 40000, 65536)  # 40000 · 65536 = 2.6e9 > 2³¹
    rows = torch.arange(40000, 40004, dtype=torch.int64)[:, None]
    assert torch.equal(out.cpu(), rows * 65536 + torch.arange(4)[None, :])


@needs_triton
def test_float64_dropout_scale_is_exact():
    from helpers import keep_mask, make_inputs

    import adalora_kernels as ak
    from adalora_kernels.reference import adalora_linear_ref

    x, w, b, P, lam, Q, m = make_inputs((24,), 48, 40, 8, torch.float64, mask=True)
    keep = keep_mask("triton", (24, 48), 0.1, 7)
    y = ak.adalora_linear(x, w, b, P, lam, Q, scaling=0.5, rank_mask=m, dropout_p=0.1, seed=7, backend="triton")
    ref = adalora_linear_ref(x, w, b, P, lam, Q, 0.5, m, keep, 0.1)
    assert torch.allclose(y, ref, rtol=1e-13, atol=1e-13)  # a float32 1/(1-p) is off by ~5e-8


@needs_triton
def test_backward_is_bitwise_reproducible_without_atomics():
    from helpers import make_inputs

    import adalora_kernels as ak
    from adalora_kernels.kernels.triton import adalora_linear as kmod

    assert "tl.atomic" not in inspect.getsource(kmod)
    # K = 600 and few rows: the shrink splits over K and the reductions over rows (several partials)
    x, w, b, P, lam, Q, m = make_inputs((40,), 600, 520, 8, torch.float32, mask=True)
    assert kmod.splits_for(1, 600, x.device) > 1
    grads = []
    for _ in range(2):
        leaves = [v.detach().clone().requires_grad_() for v in (x, P, lam, Q)]
        y = ak.adalora_linear(leaves[0], w, b, *leaves[1:], scaling=0.5, rank_mask=m, dropout_p=0.2, seed=5,
                              backend="triton")  # fmt: skip
        y.square().sum().backward()
        grads.append([y.detach(), *(v.grad for v in leaves)])
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def _split_step(leaves, w, b, m):
    import adalora_kernels as ak

    leaves = [v.detach().clone().requires_grad_() for v in leaves]
    y = ak.adalora_linear(leaves[0], w, b, *leaves[1:], scaling=0.5, rank_mask=m, dropout_p=0.2, seed=5,
                          backend="triton_split")  # fmt: skip
    y.square().sum().backward()
    return [y.detach(), *(v.grad for v in leaves)]


@needs_triton
def test_the_split_route_adds_with_atomics_unless_deterministic_algorithms_are_on(monkeypatch):
    """torch's default: the split route's split reductions add into accumulators with atomics (no partials, no dt
    finalize); under torch.use_deterministic_algorithms(True), fixed-order partials, bitwise reproducible. Both
    give the same gradients up to the order of float32 sums."""
    from adalora_kernels.kernels.triton import adalora_linear as kmod
    from adalora_kernels.kernels.triton import split

    launched = []
    real = kmod._Launch.__call__
    monkeypatch.setattr(
        kmod._Launch, "__call__", lambda self, *a, **k: launched.append(self.name) or real(self, *a, **k)
    )
    # K = 600, N = 520 and few rows: several column and row splits on every reduction
    x, w, b, P, lam, Q, m = make_inputs((40,), 600, 520, 8, torch.float32, mask=True)
    assert min(split.pass_splits(40, 520, x.device)) > 1 and min(split.pass_splits(40, 600, x.device)) > 1
    fast = _split_step((x, P, lam, Q), w, b, m)
    assert "_split_dt_finalize_kernel" not in launched
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        launched.clear()
        first, second = _split_step((x, P, lam, Q), w, b, m), _split_step((x, P, lam, Q), w, b, m)
        assert launched.count("_split_dt_finalize_kernel") == 2
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(a, c) for a, c in zip(first, second))
    for a, c in zip(fast, first):  # float32 sums of a few hundred terms in another order: a few ulps of the largest
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6 * c.abs().max().item())


def test_tf32_only_where_torch_allows_it():
    from adalora_kernels.kernels.triton import adalora_linear as kmod

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kmod.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")  # what allow_tf32 = True sets
        assert kmod.dot_precision(torch.float32) == "tf32"
        assert kmod.dot_precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


def test_every_autotune_key_buckets_m_and_names_every_flag():
    from adalora_kernels.kernels.triton import adalora_linear as kmod

    tuned = [v for v in vars(kmod).values() if isinstance(v, triton.runtime.autotuner.Autotuner)]
    assert len(tuned) == 5
    for kernel in tuned:
        params = inspect.signature(kernel.fn.fn).parameters
        assert "M" not in kernel.keys and "M_BUCKET" in kernel.keys
        flags = {n for n in params if n.startswith(("HAS_", "NEED_")) or n in ("DOT_PRECISION", "BLOCK_R", "SPLITS")}
        assert flags <= set(kernel.keys), (kernel.fn, flags - set(kernel.keys))
        sizes = {n for n in ("N", "K") if n in params}
        assert sizes <= set(kernel.keys)
        assert params["seed"].annotation in (tl.int64, "tl.int64") if "seed" in params else True
    assert kmod.m_bucket(2049) == kmod.m_bucket(4096) == 4096 and kmod.m_bucket(1) == 16


def test_prune_sizes_by_the_streamed_operand_and_drops_spilling_tiles(monkeypatch):
    from adalora_kernels.kernels.triton import config

    monkeypatch.setattr(config, "shared_memory_bytes", lambda: 163 * 1024)  # an A100
    monkeypatch.setattr(config, "autotune_enabled", lambda: True)
    cfgs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3)]
    args = {"g_ptr": torch.empty(1, dtype=torch.bfloat16), "u_ptr": torch.empty(1, dtype=torch.float32)}
    # 96 KiB for 16-bit operands; sizing by the float32 buffer u would have dropped it
    assert config.prune_by_shared_memory(cfgs, args, BLOCK_R=16, HAS_DROPOUT=False) == cfgs
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    # with dropout the mask beside a 128×256 accumulator spilled (sm_90: 520 bytes per thread)
    assert config.prune_by_shared_memory([*cfgs, small], args, BLOCK_R=16, HAS_DROPOUT=True) == [small]


@pytest.mark.parametrize("older", [False, True])
def test_prune_follows_what_the_installed_triton_spilled_per_arch(monkeypatch, older):
    from adalora_kernels.kernels.triton import config

    monkeypatch.setattr(config, "OLDER_TRITON", older)
    monkeypatch.setattr(config, "autotune_enabled", lambda: True)
    dx = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4)
    flags = {"HAS_DROPOUT": True, "HAS_ADAPTER": True}
    # dx at r = 64 with dropout: 44 bytes of spill with Triton 3.6 on sm_80 only (the compile sweeps of 3.6 and 3.9)
    assert config.spills(dx, 2, 64, flags, arch=80) == older
    assert not config.spills(dx, 2, 64, flags, arch=90)
    assert not config.spills(dx, 2, 64, {"HAS_DROPOUT": False}, arch=80)
    # the split passes' narrow tiles that spilled on sm_90 with Triton 3.6 only
    args = {"g_ptr": torch.empty(1, dtype=torch.bfloat16)}
    tiles = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=3),
             triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=2)]  # fmt: skip
    kept = config.split_prune("g")(tiles, args, BLOCK_R=16, NEED_DP=True)
    assert kept == (tiles[1:] if older else tiles)
    # two of the x pass's narrow tiles at r <= 64 spilled on sm_80 in the atomic form only (20 and 56 bytes)
    narrow = [*tiles, triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
    assert config.split_prune("x")(narrow, args, BLOCK_R=64, HAS_DROPOUT=True, ATOMIC=True) == narrow[2:]
    assert config.split_prune("x")(narrow, args, BLOCK_R=64, HAS_DROPOUT=True, ATOMIC=False) == narrow


# ------------------------------------------------------------------------------------------ compiled (no GPU)

_COMPILE = textwrap.dedent(
    """
    import json, sys, torch
    from adalora_kernels.kernels.triton import adalora_linear as k
    from adalora_kernels.kernels.triton.aot import compile_only
    out = []
    for arch in (80, 90):
        with compile_only(arch) as records:
            for M, seed in ((256, 3), (257, 2**40 + 1), (300, 2**33)):  # new token counts and seed widths
                x, w, P, lam, Q = (torch.empty(*s, dtype=torch.bfloat16) for s in
                                   ((M, 512), (384, 512), (384, 16), (16,), (16, 512)))
                _, t = k.linear_forward(x, w, None, P, lam, Q, 0.1, seed)
                k.linear_backward(torch.empty(M, 384, dtype=torch.bfloat16), x, w, P, lam, Q, t, 0.1, seed, True, True)
        out += [dict(kernel=r.kernel, arch=arch, hash=r.hash, local=r.local, fits=r.fits) for r in records]
    json.dump(out, sys.stdout)
    """
)


def test_kernels_compile_for_sm80_and_sm90_without_specialising_on_m_or_seed():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ADALORA_KERNELS_AUTOTUNE="0", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads(result.stdout)
    rows = {"_shrink_fwd_kernel", "_dt_bwd_kernel", "_rank_reduce_bwd_kernel"}
    gemms = {80: {"_fused_fwd_kernel", "_fused_dx_bwd_kernel"}, 90: {"_tma_fwd_kernel", "_tma_dx_kernel"}}  # hopper.py
    for arch in (80, 90):
        kernels = {r["kernel"] for r in records if r["arch"] == arch}
        assert kernels == rows | gemms[arch], arch
        for kernel in kernels - {"_rank_reduce_bwd_kernel"}:  # one compile serves every M and seed
            assert len({r["hash"] for r in records if r["kernel"] == kernel and r["arch"] == arch}) == 1, kernel
    assert all(r["fits"] and r["local"] == 0 for r in records), [r for r in records if r["local"] or not r["fits"]]


# ------------------------------------------------------------------------------------------ csrc and allocator


def test_csrc_backward_checks_the_saved_t_before_reading_it():
    from adalora_kernels.kernels import csrc

    if csrc.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the csrc extension is not built")
    x, w, g = torch.randn(6, 8), torch.randn(5, 8), torch.randn(6, 5)
    P, lam, Q = torch.randn(5, 3), torch.randn(3), torch.randn(3, 8)
    bwd = torch.ops.adalora_kernels.csrc_linear_bwd
    with pytest.raises(RuntimeError, match=r"t must be \(6, 3\)"):
        bwd(g, x, w, P, lam, Q, torch.randn(4, 3), 0.0, 0, True, True)  # too few rows: an out-of-bounds read
    with pytest.raises(RuntimeError, match="grad and t must have x's dtype"):
        bwd(g, x, w, P, lam, Q, torch.randn(6, 3, dtype=torch.float64), 0.0, 0, True, True)


def test_layers_sharing_an_adapter_tensor_are_refused():
    import adalora_kernels as ak

    a = ak.AdaLoRALinear.from_linear(torch.nn.Linear(8, 6), init_r=3)
    b = ak.AdaLoRALinear.from_linear(torch.nn.Linear(8, 6), init_r=3)
    b.P = a.P  # one tensor in two layers: its EMAs would be updated twice (concurrently on a GPU)
    model = torch.nn.Sequential(a, b)
    with pytest.raises(ValueError, match=r"1\.P: shares its storage with 0\.P"):
        ak.RankAllocator(model, target_r=1, total_step=10)


def test_no_atomics_in_the_csrc_cuda_layer_kernels():
    source = (ROOT / "csrc" / "cuda" / "linear_kernels.cu").read_text()
    assert "atomicAdd" not in source and "atomicCAS" not in source


def test_shared_memory_estimate_bounds_every_compiled_kernel():
    """The prune's estimate against the compiled shared memory of every kept variant of the committed sweep."""
    from adalora_kernels.kernels.triton import config

    rows = json.loads((ROOT / "benchmarks" / "results" / "triton-compile-sweep.json").read_text())["rows"]
    checked = 0
    for row in rows:
        if not row["tiles"]:
            continue
        tiles = [int(v) for v in row["tiles"].split("x")]
        assert row["local"] == 0 or row["dtype"] not in ("float16", "bfloat16"), row
        if len(tiles) == 1:  # the split route's finalize launches: one fixed tile, nothing pipelined, never pruned
            assert row["fits"] and row["kernel"].endswith("finalize_kernel"), row
            continue
        names = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if len(tiles) == 3 else ("BLOCK_M", "BLOCK_K")
        cfg = triton.Config(dict(zip(names, tiles)), num_warps=row["num_warps"], num_stages=row["num_stages"])
        size = torch.empty(0, dtype=getattr(torch, row["dtype"])).element_size()
        tma = {"_tma_fwd_kernel": "fwd", "_tma_dx_kernel": "dx"}.get(row["kernel"])  # hopper.py's GEMMs
        assert config.shared_memory_need(cfg, size, max(16, row["r"]), tma) >= row["shared"], row
        checked += 1
    assert checked > 1000


_LAUNCH_HOST = textwrap.dedent(
    """
    import json, torch, triton
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from adalora_kernels import benchmarking as bm
    before = (triton.runtime.driver._active, CompiledKernel._init_handles, Autotuner._bench)
    row = bm.triton_launch_host_row(torch.bfloat16, rounds=5)
    after = (triton.runtime.driver._active, CompiledKernel._init_handles, Autotuner._bench)
    print(json.dumps({"row": row, "restored": before == after}))
    """
)


def test_triton_launch_host_time_is_measured_without_a_gpu():
    """bench's Triton launch-path row: Triton's whole host path with the launches stubbed, and Triton's driver
    and patched methods as they were afterwards (in a subprocess: the tests run Triton interpreted)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", _LAUNCH_HOST], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["restored"] and out["row"]["launch_stubbed"] and 1 < out["row"]["us"] < 10_000


@needs_triton
def test_tuned_launches_are_recorded_and_preseeded(monkeypatch):
    """The winners of one run (``tuned_records``, written to $OUT by gpu_check.sh) preseed another
    (``ADALORA_KERNELS_TUNED``): the preseeded keys skip the autotuner."""
    import json

    from adalora_kernels.kernels.triton import adalora_linear as kernels

    x, w, b, P, lam, Q, _ = make_inputs((40,), 32, 24, 4, torch.float32, device=DEVICE)
    kernels.linear_forward(x, w, b, P, lam, Q, 0.0, 0)
    records = json.loads(json.dumps(kernels.tuned_records()))
    assert {r["kernel"] for r in records} >= {"_shrink_fwd_kernel", "_fused_fwd_kernel"}
    for launch in kernels._LAUNCHES.values():
        monkeypatch.setattr(launch, "tuned", {})
    assert kernels.preseed(records) == len(records)
    ran = []
    for launch in kernels._LAUNCHES.values():
        monkeypatch.setattr(launch.kernel, "run", lambda *a, **k: ran.append(1))  # the autotuner's entry point
    y, _ = kernels.linear_forward(x, w, b, P, lam, Q, 0.0, 0)
    assert ran == [] and y.shape == (40, 24)


def test_gpu_check_times_an_nf4_base_and_its_table_names_the_base(tmp_path, capsys):
    """Both profiles time the main shape over an nf4 base at both dropout rates (bitsandbytes carried as a wheel);
    the merged table keeps those rows apart from the nn.Linear ones."""
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    timing, merge = load("gpu_timing"), load("merge_results")
    for profile in ("smoke", "bench"):
        nf4 = [c for c in timing.cases(profile, dry=False) if c.get("base") == "nf4"]
        assert [(c["shape"], c["r"], c["p"]) for c in nf4] == [(timing.MAIN, 16, 0.0), (timing.MAIN, 16, 0.1)]
    env = {"op": "environment", "device": "GPU X", "date": "d", "torch": "t", "commit": "c" * 40}
    common = {"op": "fwd_bwd", "variant": "peft", "tokens": 8, "in": 4, "out": 4, "r": 2, "dropout": 0.0}
    rows = [env, {**common, "ms": 1.0}, {**common, "base": "nf4", "ms": 2.0}, {**common, "gemms": "portable", "ms": 3}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    merge.main(str(tmp_path))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fwd_bwd")]
    assert len(table) == 3 and "8×4×4 nf4" in table[1] and "nf4" not in table[0]
    assert "8×4×4 portable GEMMs" in table[2]  # the bench profile's fused route with its portable GEMMs


def test_gpu_timing_bench_times_the_fused_route_with_its_portable_gemms_too(monkeypatch):
    """On sm_90 the fused route runs hopper.py's GEMMs; the bench profile times it again with them off (rows
    ``"gemms": "portable"``) and turns them back on, also when a timing fails."""
    import importlib.util

    from adalora_kernels import benchmarking as bm
    from adalora_kernels.kernels.triton import hopper

    spec = importlib.util.spec_from_file_location("gpu_timing", ROOT / "benchmarks" / "gpu_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    seen = []

    def fake_rows(case, mode, rounds, graphs):
        seen.append((hopper.ENABLED, sorted(case.variants), case.dropout, graphs))
        return [{"op": mode, "variant": v, "ms": 1.0} for v in case.variants]

    monkeypatch.setattr(bm, "timing_rows", fake_rows)
    rows = timing.portable_gemm_rows(torch.float32, torch.device("cpu"), dry=True)
    assert seen == [(False, ["linear", "triton"], p, True) for p in (0.0, 0.1)] and hopper.ENABLED
    assert len(rows) == 4 and all(r["gemms"] == "portable" for r in rows)
    monkeypatch.setattr(bm, "timing_rows", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        timing.portable_gemm_rows(torch.float32, torch.device("cpu"), dry=True)
    assert hopper.ENABLED


def test_gpu_timing_bench_times_the_split_route_with_fixed_order_partials_too(monkeypatch):
    """The split route adds with atomics by default; the bench profile times it again with deterministic algorithms
    on (rows ``"reductions": "fixed-order"``), without torch's NaN fills, and restores both settings after."""
    import importlib.util

    from adalora_kernels import benchmarking as bm

    spec = importlib.util.spec_from_file_location("gpu_timing", ROOT / "benchmarks" / "gpu_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    seen = []

    def fake_rows(case, mode, rounds, graphs):
        det = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
        seen.append((det, sorted(case.variants), case.dropout))
        return [{"op": mode, "variant": v, "ms": 1.0} for v in case.variants]

    monkeypatch.setattr(bm, "timing_rows", fake_rows)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    rows = timing.fixed_order_split_rows(torch.float32, torch.device("cpu"), dry=True)
    assert seen == [((True, False), ["linear", "triton_split"], p) for p in (0.0, 0.1)]
    assert len(rows) == 4 and all(r["reductions"] == "fixed-order" for r in rows)
    monkeypatch.setattr(bm, "timing_rows", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        timing.fixed_order_split_rows(torch.float32, torch.device("cpu"), dry=True)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory == fill
