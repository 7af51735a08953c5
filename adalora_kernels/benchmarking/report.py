"""Rows of the results files (DESIGN §5): every variant of a case with its ratios to the frozen layer and to
PEFT, GPU time beside the eager step, and auto's choice."""

from __future__ import annotations

import torch

from .cases import Case
from .ledger import Shape, ledger_rows
from .timers import graph_timings, time_cpu_interleaved, time_gpu_eager


def _ratios(row: dict, values: dict[str, dict], key: str, prefix: str = "") -> None:
    """``<prefix>slowdown_vs_linear`` and ``<prefix>speedup_vs_peft(_compiled)`` of ``row`` from ``values[v][key]``
    of the same run."""
    mine = row.get(key)
    if mine is None:
        return
    base = values.get("linear", {}).get(key)
    if base:
        row[f"{prefix}slowdown_vs_linear"] = mine / base
    if row["variant"] == "linear":
        return
    for peft in ("peft", "peft_compiled"):
        theirs = values.get(peft, {}).get(key)
        if theirs:
            row[f"{prefix}speedup_vs_{peft}"] = theirs / mine


def timing_rows(case: Case, mode: str, rounds: int, graphs: bool = False) -> list[dict]:
    """DESIGN §5 rows of every variant of ``case``: ``ms`` with ``p20_ms``/``p80_ms`` (on a GPU an eager step on this
    host), ``slowdown_vs_linear``, ``speedup_vs_peft`` and ``speedup_vs_peft_compiled``; with ``graphs`` (CUDA,
    fwd_bwd) the GPU time of the step, ``graph_ms`` (the primary number there) and its quantiles and ratios, and
    ``host_bound_ms`` = eager − graph."""
    cuda = case.device.type == "cuda"
    eager = time_gpu_eager(case, mode) if cuda else time_cpu_interleaved(case, mode, rounds)
    graph = graph_timings(case) if graphs and cuda and mode == "fwd_bwd" else {}
    predicted = _predictions(case) if cuda and case.base == "linear" else {}  # (the ledger has no quantised base)
    rows = []
    for name, module in case.variants.items():
        if name not in eager:
            rows.append(case.row(mode, name, unavailable=str(module)))
            continue
        row = case.row(mode, name, **eager[name], **graph.get(name, {}))
        _ratios(row, eager, "ms")
        _ratios(row, graph, "graph_ms", prefix="graph_")
        if "graph_ms" in row:
            row["host_bound_ms"] = row["ms"] - row["graph_ms"]
        if cuda and mode == "fwd_bwd" and name in predicted:  # the ledger's prediction beside the measurement
            row["predicted_ms"] = predicted[name]
        rows.append(row)
    return rows


def _predictions(case: Case) -> dict[str, float]:
    """The ledger's predicted fwd+bwd milliseconds of every route at the case's shape (H200 ceilings)."""
    dtype = str(case.dtype).removeprefix("torch.")
    shape = Shape(case.tokens, case.in_f, case.out_f, case.r, dtype, case.dropout)
    return {row["variant"]: row["predicted_ms"] for row in ledger_rows(shape) if row["op"] == "ledger_total"}


def auto_choice(case: Case) -> dict:
    """On CUDA, which backend ``auto`` picks for this case (timed once, cached as in training) and what each
    candidate measured, as extra keys for the case's rows; empty where auto has nothing to choose."""
    from ..ops.adalora_linear import auto_key, time_backend_ms
    from ..ops.backend import auto_choices, measured_choice, runnable

    candidates = runnable(case.device)
    if case.device.type != "cuda" or len(candidates) < 2:
        return {}
    weight = torch.empty(case.out_f, case.in_f, dtype=case.dtype, device="meta")
    key = auto_key(case.x, weight, weight[:, 0], torch.empty(case.r, device="meta"), case.dropout)
    chosen = measured_choice(key, candidates, lambda b: time_backend_ms(b, key, case.device))
    return {"auto_choice": chosen, "auto_candidates_ms": auto_choices()[key][1]}
