"""The timing stage of ``benchmarks/gpu_check.sh``, in one process for every case: the sentinels, the cases of a
profile, the sentinels again. Each row is appended to ``DIR/rows.jsonl`` the moment it exists (a stage cut short
keeps every row it made); the Triton launches' tuning goes to ``DIR/autotune.json`` at the end.

    python benchmarks/gpu_timing.py --profile smoke|bench|model --out DIR [--dry-run]

Profiles (DESIGN §6): ``smoke``, the main shape (8192×4096×4096, r = 16, bf16) at dropout 0 and 0.1, fwd+bwd as
CUDA-graph replays beside the eager step, and the profiler's kernel table, then the same over an nf4 base
(bitsandbytes' ``Linear4bit``; PEFT's ``SVDLinear4bit`` against ours, where bitsandbytes imports); ``bench`` adds
fwd and bwd alone, r = 64, the other LLaMA shapes, the fused route with its portable GEMMs (on sm_90 the rows above
time it with hopper.py's), the split route with fixed-order partials (the rows above: atomics), the per-call cost,
the allocator step and memory; ``model``, whole training steps of a 4-layer LLaMA-7B-wide model at 8192 tokens
(``adalora-kernels bench-model``) at both rates.
``--dry-run``: the same stages on the CPU at tiny shapes in float32 (the GPU-only parts say so in their rows).

Sentinels: a cuBLAS bf16 8192×4096×4096 GEMM (TFLOP/s), a 1 GiB device-to-device copy (GB/s, bytes read plus
written) and an ``nn.Linear`` 8×16×16 fwd+bwd (µs, the host), at the start and at the end; a drift over 5 %
flags the run (``op: "sentinel"`` rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adalora_kernels import benchmarking as bm  # noqa: E402

MAIN = (8192, 4096, 4096)
OTHERS = [(8192, 4096, 1024), (8192, 4096, 14336), (8192, 14336, 4096)]
DRY = {"main": (256, 128, 128), "others": [(256, 128, 64), (256, 64, 128)]}
DRIFT = 0.05


class Rows:
    """Rows appended to a JSONL file as they come, each line flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a")

    def add(self, rows: list[dict] | dict) -> None:
        for row in [rows] if isinstance(rows, dict) else rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def _median_ms(fn, device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=200, return_mode="median")
    samples = []
    fn()
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def sentinels(device: torch.device, dry: bool) -> dict[str, float]:
    """The machine's three reference numbers: GEMM rate, copy bandwidth, one tiny fwd+bwd's host time."""
    m, n, k = (256, 128, 128) if dry else (8192, 4096, 4096)
    dtype = torch.float32 if dry else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=gen)
    gemm_ms = _median_ms(lambda: a @ b, device)
    src = torch.randn((16 << 20) if dry else (256 << 20), device=device, generator=gen)  # 64 MiB / 1 GiB fp32
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device)
    layer = torch.nn.Linear(16, 16, device=device)
    x = torch.randn(8, 16, device=device, requires_grad=True)

    def tiny():
        layer(x).sum().backward()

    host_ms = bm.time_calls({"linear": tiny}, 50, device)["linear"]
    return {
        "gemm_tflops": 2 * m * n * k / gemm_ms / 1e9,
        "copy_gbps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "linear_8x16x16_us": host_ms * 1e3,
    }


def sentinel_rows(values: dict[str, float], when: str, start: dict[str, float] | None) -> list[dict]:
    rows = []
    for name, value in values.items():
        row = {"op": "sentinel", "name": name, "value": value, "when": when}
        if start is not None:
            row["drift"] = value / start[name] - 1
            row["drift_flag"] = abs(row["drift"]) > DRIFT
        rows.append(row)
    return rows


def cases(profile: str, dry: bool) -> list[dict]:
    """What a profile times: (shape, rank, dropout rates, modes, graphs, kernel table)."""
    main = DRY["main"] if dry else MAIN
    others = DRY["others"] if dry else OTHERS
    out = [{"shape": main, "r": 16, "p": p, "modes": ["fwd_bwd"], "kernels": True} for p in (0.0, 0.1)]
    # an nf4 base (bitsandbytes, carried as a wheel: gpu_check.sh's .whl): ours against PEFT's SVDLinear4bit
    out += [{"shape": main, "r": 16, "p": p, "modes": ["fwd_bwd"], "kernels": False, "base": "nf4"} for p in (0.0, 0.1)]
    if profile == "bench":
        out += [{"shape": main, "r": 16, "p": p, "modes": ["fwd", "bwd"], "kernels": False} for p in (0.0, 0.1)]
        out += [{"shape": main, "r": 64, "p": p, "modes": ["fwd_bwd"], "kernels": False} for p in (0.0, 0.1)]
        out += [{"shape": s, "r": 16, "p": p, "modes": ["fwd_bwd"], "kernels": False} for s in others
                for p in (0.0, 0.1)]  # fmt: skip
    return out


def _main_shape_rows(dtype: torch.dtype, device: torch.device, dry: bool, variant: str, tag: dict) -> list[dict]:
    """``variant`` beside the frozen layer at the main shape, both rates, fwd+bwd with graphs; rows tagged."""
    out = []
    for p in (0.0, 0.1):
        case = bm.make_case(*(DRY["main"] if dry else MAIN), 16, dtype, p, device, variants=["linear", variant])
        out += [{**row, **tag} for row in bm.timing_rows(case, "fwd_bwd", rounds=20, graphs=True)]
    return out


def portable_gemm_rows(dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """The main shape's fused route (``triton``) with its portable GEMMs, beside the frozen layer, at both rates
    (rows ``"gemms": "portable"``): on sm_90 the other rows time it with hopper.py's, so one lease compares them."""
    try:
        from adalora_kernels.kernels.triton import hopper
    except ImportError:
        return []
    hopper.ENABLED = False
    try:
        return _main_shape_rows(dtype, device, dry, "triton", {"gemms": "portable"})
    finally:
        hopper.ENABLED = True


def fixed_order_split_rows(dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """The main shape's split route with its fixed-order partials (as under ``torch.use_deterministic_algorithms``),
    beside the frozen layer, at both rates (rows ``"reductions": "fixed-order"``): the other rows time its atomics,
    so one lease says which is faster. Uninitialised memory is not filled (that would time torch's NaN fills), and
    torch's alerts for cuBLAS are silenced (``warn_only``), as the route is what is timed."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _main_shape_rows(dtype, device, dry, "triton_split", {"reductions": "fixed-order"})
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=["smoke", "bench", "model"], default="smoke")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny shapes, float32")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    rows = Rows(args.out / "rows.jsonl")
    rows.add({"op": "environment", **bm.environment(device), "profile": args.profile, "dry_run": dry})

    start = sentinels(device, dry)
    rows.add(sentinel_rows(start, "start", None))
    if args.profile == "model":  # whole-model steps (#19 item 7): frozen, PEFT eager and compiled, ours
        from adalora_kernels.benchmarking.model_step import ModelShape, model_step_rows

        shape, skip = (ModelShape.quick(), ["peft_compiled"]) if dry else (ModelShape(), [])
        variants = [v for v in ("frozen", "peft", "peft_compiled", "ours") if v not in skip]
        for p in (0.0, 0.1):
            began = time.perf_counter()
            rows.add(model_step_rows(shape, dtype, device, dropout=p, variants=variants, rounds=8, warmup=3))
            print(f"model steps p={p}: {time.perf_counter() - began:.0f} s", flush=True)
    for case_spec in cases(args.profile, dry) if args.profile != "model" else []:
        tokens, in_f, out_f = case_spec["shape"]
        base = case_spec.get("base", "linear")
        try:
            case = bm.make_case(tokens, in_f, out_f, case_spec["r"], dtype, case_spec["p"], device, base=base)
        except ImportError as exc:  # bitsandbytes not carried
            rows.add({"op": "fwd_bwd", "base": base, "unavailable": f"{exc}"})
            print(f"{base} base: skipped ({exc})", flush=True)
            continue
        auto = bm.auto_choice(case)
        for mode in case_spec["modes"]:
            began = time.perf_counter()
            new = [{**row, **auto} for row in bm.timing_rows(case, mode, rounds=20, graphs=mode == "fwd_bwd")]
            rows.add(new)
            print(f"{mode} {base} {tokens}×{in_f}×{out_f} r={case_spec['r']} p={case_spec['p']}: "
                  f"{time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip
        if case_spec["kernels"]:
            rows.add(bm.kernel_table(case))
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile == "bench":
        rows.add(portable_gemm_rows(dtype, device, dry))
        rows.add(fixed_order_split_rows(dtype, device, dry))
        from types import SimpleNamespace

        from adalora_kernels.cli import allocator_rows

        rows.add(bm.host_overhead_rows(dtype, device, None))
        rows.add(allocator_rows(SimpleNamespace(device=device, quick=dry)))
        rows.add(bm.memory_rows(bm.make_case(*(DRY["main"] if dry else MAIN), 16, dtype, 0.1, device)))
    rows.add(sentinel_rows(sentinels(device, dry), "end", start))
    if not dry:
        try:
            from adalora_kernels.kernels.triton import adalora_linear

            (args.out / "autotune.json").write_text(json.dumps(adalora_linear.tuned_records(), indent=1))
        except ImportError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
