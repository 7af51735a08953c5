"""Timers (DESIGN §5). Every variant runs on the same inputs in the same process, interleaved, and ratios are
taken between variants of one run only.

- CPU: interleaved rounds (A B C, B C A, C A B, …: each round starts one variant later), medians.
- GPU, the primary number: fwd+bwd captured in a CUDA graph (``graph_timings``), its GPU time without the host.
- GPU, eager: ``triton.testing.do_bench`` medians with p20/p80, "an eager step on this host".
- Per call: the host's cost of one fwd+bwd at a tiny shape, and what it dispatches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import Case, all_variants, clear_grads, make_case, step_fn
from .environment import steady_cpu_heap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rotated(names: list[str], i: int) -> list[str]:
    """Round ``i`` of an interleaved run starts ``i`` variants later, so no variant always follows another."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


def spread(samples: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of a list of milliseconds."""
    if len(samples) < 2:
        return {"ms": samples[0], "p20_ms": samples[0], "p80_ms": samples[0]}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"ms": statistics.median(samples), "p20_ms": deciles[1], "p80_ms": deciles[7]}


def time_cpu_interleaved(case: Case, mode: str, rounds: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Per runnable variant: median, p20 and p80 milliseconds, round-robin so noise hits every variant alike."""
    steady_cpu_heap()
    runnable = {k: v for k, v in case.variants.items() if isinstance(v, nn.Module)}
    fns = {k: step_fn(m, case, mode) for k, m in runnable.items()}
    samples: dict[str, list[float]] = {k: [] for k in runnable}
    for i in range(warmup + rounds):
        for name in _rotated(list(fns), i):
            timed, setup = fns[name]
            if setup is not None:
                setup()
            _sync(case.device)
            start = time.perf_counter()
            timed()
            _sync(case.device)
            if i >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
            clear_grads(runnable[name], case.x)
    return {k: spread(v) for k, v in samples.items()}


def time_gpu_eager(case: Case, mode: str, rep_ms: int = 100) -> dict[str, dict[str, float]]:
    """Per runnable variant: an eager step on this host, ``triton.testing.do_bench``'s median, p20 and p80
    (CUDA events, L2 flushed; host time included wherever the host is slower than the GPU)."""
    from triton.testing import do_bench

    out = {}
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module):
            continue
        timed, setup = step_fn(module, case, mode)
        grads = [case.x, *module.parameters()]
        if setup is None:
            q = do_bench(timed, rep=rep_ms, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
        else:  # backward alone: one fresh forward, then time backward with the graph kept
            setup()
            y = module(case.x)
            q = do_bench(lambda y=y: y.backward(case.grad, retain_graph=True), rep=rep_ms, grad_to_none=grads,
                         quantiles=[0.5, 0.2, 0.8])  # fmt: skip
        out[name] = {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
        clear_grads(module, case.x)
    return out


GRAPH_SEED = 1234  # our layers' dropout seed under capture: a fixed mask (the seed is drawn on the host otherwise)


def _capture(module: nn.Module, case: Case, steps: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``steps`` fwd+bwd of ``module``, each on inputs of its own (rotated, so none is in L2 from
    the one before), grads cleared before each, so the graph holds no accumulation into a gradient that the
    eager step would not do either. Warmed up (autotuning, compiles, the allocator's pool) on a side stream."""
    pairs = [(case.x, case.grad)] + [
        (torch.randn_like(case.x).requires_grad_(), torch.randn_like(case.grad)) for _ in range(steps - 1)
    ]

    def run():
        for x, g in pairs:
            clear_grads(module, x)
            module(x).backward(g)

    for layer in module.modules():
        if hasattr(layer, "seed"):  # our layers: a host-drawn seed under capture would be one mask for every replay
            layer.seed = GRAPH_SEED
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for x, _ in pairs:
        clear_grads(module, x)
    return graph


def graph_timings(case: Case, reps: int = 20, steps: int = 4, flush_mib: int = 256) -> dict[str, dict]:
    """GPU time of fwd+bwd (DESIGN §5's primary number): per variant, a CUDA graph of ``steps`` fwd+bwd (rotated
    inputs), replayed ``reps`` times interleaved across variants (each round starts one variant later) after a
    warm-up round, L2 flushed before each replay outside the timed span; median, p20 and p80 of a step, or why it
    could not be captured (``graph_error``)."""
    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    out: dict[str, dict] = {}
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module):
            continue
        try:
            graphs[name] = _capture(module, case, steps)
        except Exception as exc:  # a variant that cannot be captured (a host sync, say) keeps its eager row
            out[name] = {"graph_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.synchronize()
        clear_grads(module, case.x)
    flush = torch.empty(flush_mib << 20, dtype=torch.int8, device=case.device)
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for i in range(reps + 1):
        for name in _rotated(list(graphs), i):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[name].replay()
            end.record()
            end.synchronize()
            if i:
                samples[name].append(start.elapsed_time(end) / steps)
    for name, values in samples.items():
        out[name] = {f"graph_{k}": v for k, v in spread(values).items()} | {"graph_steps": steps, "graph_reps": reps}
    del graphs
    torch.cuda.empty_cache()
    return out


def kernel_table(case: Case, steps: int = 3) -> list[dict]:
    """Per variant, what one fwd+bwd runs, from ``torch.profiler`` over ``steps`` of them after a warm-up: every
    kernel (on CUDA; every op's self time on the CPU) with calls, total and mean µs per step, as
    ``op: "kernel"`` rows."""
    from torch.profiler import ProfilerActivity, profile

    cuda = case.device.type == "cuda"
    rows = []
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module):
            continue
        timed, _ = step_fn(module, case, "fwd_bwd")
        timed()
        clear_grads(module, case.x)
        _sync(case.device)
        try:
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    timed()
                    clear_grads(module, case.x)
                _sync(case.device)
        except Exception as exc:  # no CUPTI (some VMs)
            rows.append(case.row("kernel", name, kernel_error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        for event in prof.key_averages():
            on_device = event.device_type.name == "CUDA"
            if cuda != on_device:
                continue
            total = event.self_device_time_total if cuda else event.self_cpu_time_total
            if total <= 0:
                continue
            rows.append(case.row("kernel", name, kernel=event.key, calls=event.count / steps,
                                 total_us=total / steps, mean_us=total / event.count,
                                 device_time=cuda))  # fmt: skip
    return rows


OVERHEAD_SHAPE = (8, 16, 16, 4)  # tokens, in, out, r: compute is negligible, what is left is per-call cost


class _OpCount(TorchDispatchMode):
    """Counts the tensor ops dispatched that are not views: what a call runs besides Python (on a GPU,
    each launches at least one kernel). A native op counts once, whatever it runs inside."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def per_call_work(module: nn.Module, case: Case) -> dict:
    """What one fwd+bwd of ``module`` runs: ``ops_per_call`` (dispatched ops, views not counted) and, on CUDA,
    ``kernels_per_call`` (GPU kernels and memsets the profiler saw launched, Triton's and the extension's
    included)."""
    timed, _ = step_fn(module, case, "fwd_bwd")
    timed()  # warm: first calls tune, compile and allocate
    clear_grads(module, case.x)
    with _OpCount() as count:
        timed()
    clear_grads(module, case.x)
    out = {"ops_per_call": count.ops}
    if case.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                timed()
                torch.cuda.synchronize()
            out["kernels_per_call"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        except Exception as exc:  # no CUPTI (some VMs): the timings stand without the count
            out["kernels_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        clear_grads(module, case.x)
    return out


def host_overhead_rows(dtype: torch.dtype, device: torch.device, variants: list[str] | None, rounds: int = 200):
    """Per-call cost of one fwd+bwd at a tiny shape (Python dispatch, autograd, small ops, launches), per variant,
    interleaved: ``us`` and ``overhead_us`` above the frozen ``nn.Linear`` at the same shape."""
    tokens, in_f, out_f, r = OVERHEAD_SHAPE
    wanted = [v for v in (variants or all_variants()) if v != "peft_compiled"]  # its compile is not per call
    rows = []
    for p in (0.0, 0.1):
        case = make_case(tokens, in_f, out_f, r, dtype, p, device, wanted)
        ms = {k: v["ms"] for k, v in time_cpu_interleaved(case, "fwd_bwd", rounds, warmup=20).items()}
        for name, value in ms.items():
            row = case.row("fwd_bwd", name, ms=value, us=value * 1e3, host_overhead=True)
            row |= per_call_work(case.variants[name], case)
            if "linear" in ms:
                row["overhead_us"] = (value - ms["linear"]) * 1e3
                row["slowdown_vs_linear"] = value / ms["linear"]
            if "peft" in ms and name != "linear":
                row["speedup_vs_peft"] = ms["peft"] / value
            rows.append(row)
    return rows


def triton_launch_host_row(dtype: torch.dtype, rounds: int = 500) -> dict | None:
    """Host time of the Triton backend's fwd+bwd at the per-call shape with every kernel launch stubbed
    (``aot.launches_stubbed``: autotuner, JIT dispatch and the launchers' own work, no GPU), as a
    ``host_overhead`` row; ``None`` where Triton's NVIDIA backend is not importable or runs interpreted."""
    try:
        from ..kernels.triton import adalora_linear as kernels
        from ..kernels.triton.aot import launches_stubbed
        from ..kernels.triton.config import INTERPRET
    except ImportError:
        return None
    if INTERPRET:
        return None
    tokens, in_f, out_f, r = OVERHEAD_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(tokens, n, generator=gen).to(dtype) for n in (in_f, out_f))
    weight, bias = torch.randn(out_f, in_f, generator=gen).to(dtype), torch.zeros(out_f, dtype=dtype)
    P, lam, Q = (torch.randn(*s, generator=gen).to(dtype) for s in ((out_f, r), (r,), (r, in_f)))

    def call():
        _, t = kernels.linear_forward(x, weight, bias, P, lam, Q, 0.1, 7)
        kernels.linear_backward(g, x, weight, P, lam, Q, t, 0.1, 7, True, True)

    with launches_stubbed(90):
        call()  # compiles for sm_90 once
        ms = time_calls({"triton": call}, rounds, torch.device("cpu"))["triton"]
    row = {"op": "fwd_bwd", "variant": "triton_launch_stubbed", "tokens": tokens, "in": in_f, "out": out_f, "r": r,
           "dtype": str(dtype).removeprefix("torch."), "dropout": 0.1, "ms": ms, "us": ms * 1e3,
           "host_overhead": True, "launch_stubbed": True}  # fmt: skip
    return row


def time_calls(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms of each callable, interleaved (rotating order), after one warm-up round."""
    if device.type == "cpu":
        steady_cpu_heap()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 1):
        for name in _rotated(list(fns), i):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if i:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_allocator_step(pm, allocators, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms of one masking ``update_and_allocate`` (step 1 of a 1000-step run): PEFT vs ours."""
    fns = {"peft": lambda: pm.base_model.update_and_allocate(1)}
    fns |= {name: (lambda a=a: a.update_and_allocate(1)) for name, a in allocators.items()}
    return time_calls(fns, rounds, device)


def time_orth_reg(Ps, Qs, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms of the regulariser's fwd+bwd: PEFT's one-norm-per-matrix loop vs ours, batched."""
    from ..modules import orthogonal_regularization_of

    def per_matrix():
        total = 0
        for P in Ps:
            total = total + torch.norm(P.T @ P - torch.eye(P.shape[1], device=P.device, dtype=P.dtype))
        for Q in Qs:
            total = total + torch.norm(Q @ Q.T - torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype))
        return total / (len(Ps) + len(Qs))

    fns = {"peft": lambda: per_matrix().backward(), "torch": lambda: orthogonal_regularization_of(Ps, Qs).backward()}
    return time_calls(fns, rounds, device)
