"""``adalora-kernels``: benchmark our layer against the frozen nn.Linear and PEFT's SVDLinear.

``bench`` times forward+backward of each variant on the same inputs, interleaved (A B C A B C …) so that a
noisy machine slows all of them alike, and reports medians and ratios (DESIGN §5).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import torch
from torch import nn

from .kernels import backend_names, unavailable_reason
from .modules import AdaLoRALinear

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _peft_layer(linear: nn.Linear, r: int, alpha: float, dropout: float):
    import peft  # optional: a benchmark dependency

    holder = nn.Sequential()
    holder.add_module("lin", linear)
    cfg = peft.AdaLoraConfig(
        init_r=r, target_r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["lin"], total_step=10
    )
    return peft.get_peft_model(holder, cfg).base_model.model.lin


def build_variants(tokens, in_f, out_f, r, dtype, dropout, device, alpha=8.0):
    """One frozen nn.Linear shared by every variant; adapters of rank r; the inputs to time them on."""
    linear = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    variants: dict[str, nn.Module | str] = {"linear": linear}
    try:
        variants["peft"] = _peft_layer(linear, r, alpha, dropout).to(device=device, dtype=dtype)
    except ImportError as exc:
        variants["peft"] = f"peft is not installed ({exc})"
    for name in backend_names():
        reason = unavailable_reason(name, torch.device(device))
        if reason is not None:
            variants[name] = reason
            continue
        layer = AdaLoRALinear.from_linear(linear, init_r=r, lora_alpha=alpha, lora_dropout=dropout, backend=name)
        variants[name] = layer
    for module in variants.values():
        if isinstance(module, nn.Module):
            module.train()
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    return variants, x, grad


def _fwd_bwd(module, x, grad):
    module(x).backward(grad)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants, x, grad, rounds, device, warmup=2):
    """Median seconds of fwd+bwd per runnable variant, measured round-robin."""
    runnable = {k: v for k, v in variants.items() if isinstance(v, nn.Module)}
    times: dict[str, list[float]] = {k: [] for k in runnable}
    for i in range(warmup + rounds):
        for name, module in runnable.items():
            _sync(device)
            start = time.perf_counter()
            _fwd_bwd(module, x, grad)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            x.grad = None
            for p in module.parameters():
                p.grad = None
    return {k: statistics.median(v) for k, v in times.items()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def bench(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    dtype = DTYPES[args.dtype]
    rows = []
    shapes = [tuple(int(v) for v in args.shape.split(","))]
    for tokens, in_f, out_f in shapes:
        for r in args.rank:
            for dropout in args.dropout:
                variants, x, grad = build_variants(tokens, in_f, out_f, r, dtype, dropout, args.device)
                medians = time_interleaved(variants, x, grad, args.rounds, args.device)
                base, peft_ms = medians["linear"], medians.get("peft")
                for name, module in variants.items():
                    row = {
                        "op": "fwd_bwd",
                        "variant": name,
                        "tokens": tokens,
                        "in": in_f,
                        "out": out_f,
                        "r": r,
                        "dtype": args.dtype,
                        "dropout": dropout,
                    }
                    if name in medians:
                        row["ms"] = medians[name] * 1e3
                        row["slowdown_vs_linear"] = medians[name] / base
                        if peft_ms:
                            row["speedup_vs_peft"] = peft_ms / medians[name]
                    else:
                        row["unavailable"] = module
                    rows.append(row)
    result = {
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "commit": _commit(),
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "rows": rows,
    }
    table = Table(title=f"fwd+bwd, median of {args.rounds} interleaved rounds on {result['device']}")
    for col in ("variant", "tokens×in×out", "r", "dropout", "ms", "vs linear", "vs PEFT"):
        table.add_column(col)
    for row in rows:
        if "ms" not in row:
            table.add_row(row["variant"], "", str(row["r"]), str(row["dropout"]), "—", row["unavailable"][:60], "")
            continue
        table.add_row(
            row["variant"],
            f"{row['tokens']}×{row['in']}×{row['out']}",
            str(row["r"]),
            str(row["dropout"]),
            f"{row['ms']:.2f}",
            f"{row['slowdown_vs_linear']:.3f}",
            f"{row['speedup_vs_peft']:.2f}×" if "speedup_vs_peft" in row else "",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adalora-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time fwd+bwd of nn.Linear, PEFT's SVDLinear and our backends, side by side")
    b.add_argument("--shape", default="2048,1024,1024", help="tokens,in,out (default: %(default)s)")
    b.add_argument("--rank", type=int, nargs="+", default=[12], help="adapter ranks (default: %(default)s)")
    b.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1], help="dropout rates (default: %(default)s)")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default: %(default)s)")
    b.add_argument("--quick", action="store_true", help="a small shape and few rounds")
    b.add_argument("--json", help="write the results (DESIGN §5 format) to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "bench":
        if args.quick:
            args.shape, args.rounds = "1024,512,512", 10
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
