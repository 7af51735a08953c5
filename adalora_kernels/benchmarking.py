"""The one setup factory and the measurements behind ``adalora-kernels bench|memory`` and ``benchmarks/``.

Protocol (DESIGN §5): every variant runs on the same inputs in the same process; on the CPU the variants are
interleaved (A B C, B C A, C A B, …: each round starts one variant later) and medians are compared, on a GPU
``triton.testing.do_bench`` (CUDA events, L2 flushed) gives medians. Ratios are taken between variants of the
same run only.

On the CPU, glibc gives the pages of a freed large block back to the system and the next allocation of that
size faults them in again, so whichever variant runs after a memory-hungry one (PEFT's dropout) paid for its
frees: up to 8 % of a step at 2048×1024×1024. ``steady_cpu_heap`` keeps freed memory in the heap for the
whole benchmark (what a training loop reaches by itself after a few steps), which makes CPU timings
repeatable; ``environment`` records that it did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .integrations import inject_adalora
from .kernels import backend_names, unavailable_reason
from .modules import AdaLoRALinear, RankAllocator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("fwd", "bwd", "fwd_bwd")
BASELINES = ("linear", "peft", "peft_compiled")

# (in, out) of the projections of each model; tokens come from --tokens
PRESETS: dict[str, list[tuple[int, int]]] = {
    "cpu-small": [(1024, 1024), (1024, 2816), (2816, 1024)],
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "llama-70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
}
DEFAULT_TOKENS = {"cpu": 2048, "cuda": 8192}


def all_variants() -> list[str]:
    return [*BASELINES, *backend_names()]


def measurable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be measured on ``device`` (``None`` if it can): it cannot run there, or it
    only runs through the Triton interpreter, whose timings and launches mean nothing."""
    reason = unavailable_reason(backend, device)
    if reason is None and backend == "triton" and device.type != "cuda":
        return "Triton runs on the CPU only through its interpreter: not measured"
    return reason


def measurable_backends(device: torch.device) -> list[str]:
    return [b for b in backend_names() if measurable_reason(b, device) is None]


# --------------------------------------------------------------------------------------------- environment


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def steady_cpu_heap() -> str | None:
    """Keep freed memory in the process heap (glibc only): a description of what was set, or ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mmap_max = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit machines
        if not (libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, mmap_max)):
            return None
    except (OSError, AttributeError):
        return None
    return "glibc mallopt: M_TRIM_THRESHOLD=1GiB, M_MMAP_THRESHOLD=32MiB"


def environment(device: torch.device) -> dict:
    env = {
        "device": device_name(device),
        "torch": torch.__version__.split("+")[0],
        "commit": git_commit(),
        "date": date.today().isoformat(),
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        env["cpu_heap"] = steady_cpu_heap()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(tokens: int, in_f: int, out_f: int, r: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a case whose tensors cannot fit in the device's free memory."""
    size = torch.empty((), dtype=dtype).element_size()
    # x, dx, PEFT's dropped copy of x and its mask; y and g; W; adapters: a generous upper bound
    need = size * (4 * tokens * in_f + 3 * tokens * out_f + in_f * out_f + 8 * r * (tokens + in_f + out_f))
    free = available_bytes(device)
    if need > 0.8 * free:
        raise MemoryError(
            f"shape tokens={tokens}, in={in_f}, out={out_f} ({dtype}) needs about {need / 2**30:.1f} GiB but "
            f"{device} has {free / 2**30:.1f} GiB free; choose a smaller --tokens or preset"
        )


# --------------------------------------------------------------------------------------------- the factory


@dataclass
class Case:
    """One benchmark case: the variants (a module, or why it is unavailable) and their inputs."""

    tokens: int
    in_f: int
    out_f: int
    r: int
    dtype: torch.dtype
    dropout: float
    device: torch.device
    variants: dict[str, nn.Module | str]
    x: torch.Tensor
    grad: torch.Tensor

    def row(self, op: str, variant: str, **values) -> dict:
        return {
            "op": op, "variant": variant, "tokens": self.tokens, "in": self.in_f, "out": self.out_f, "r": self.r,
            "dtype": str(self.dtype).removeprefix("torch."), "dropout": self.dropout, **values,
        }  # fmt: skip


def peft_svd_linear(linear: nn.Linear, r: int, lora_alpha: float, dropout: float) -> nn.Module:
    """PEFT's ``SVDLinear`` around ``linear`` (shared), adapters initialised as PEFT does."""
    import peft

    holder = nn.Module()
    holder.lin = linear
    cfg = peft.AdaLoraConfig(
        init_r=r, target_r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["lin"], total_step=10
    )
    return peft.get_peft_model(holder, cfg).base_model.model.lin


def make_case(
    tokens: int,
    in_f: int,
    out_f: int,
    r: int,
    dtype: torch.dtype,
    dropout: float,
    device: torch.device | str,
    variants: list[str] | None = None,
    lora_alpha: float = 8.0,
) -> Case:
    """The frozen nn.Linear (shared by every variant), PEFT's layer and ours around it, and inputs."""
    device = torch.device(device)
    check_fits(tokens, in_f, out_f, r, dtype, device)
    wanted = variants or all_variants()
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    built: dict[str, nn.Module | str] = {}
    peft_layer: nn.Module | str | None = None
    for name in wanted:
        if name == "linear":
            built[name] = linear
        elif name in ("peft", "peft_compiled"):
            if peft_layer is None:
                try:
                    peft_layer = peft_svd_linear(linear, r, lora_alpha, dropout).to(device=device, dtype=dtype)
                    with torch.no_grad():
                        peft_layer.lora_E["default"].normal_()
                except ImportError as exc:
                    peft_layer = f"peft is not installed ({exc})"
            if isinstance(peft_layer, str) or name == "peft":
                built[name] = peft_layer
            else:
                built[name] = torch.compile(peft_layer)
        else:
            reason = measurable_reason(name, device)
            if reason is not None:
                built[name] = reason
                continue
            layer = AdaLoRALinear.from_linear(
                linear, init_r=r, lora_alpha=lora_alpha, lora_dropout=dropout, backend=name
            )
            with torch.no_grad():
                layer.lam.normal_()
            built[name] = layer
    for module in built.values():
        if isinstance(module, nn.Module):
            module.train()
    x = torch.randn(tokens, in_f, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(tokens, out_f, generator=gen).to(device=device, dtype=dtype)
    return Case(tokens, in_f, out_f, r, dtype, dropout, device, built, x, grad)


# --------------------------------------------------------------------------------------------- timing


def _clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(module: nn.Module, case: Case, mode: str) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """``(timed, untimed_setup)`` for one mode: forward, backward (of a fresh forward), or both."""
    if mode == "fwd":
        return (lambda: module(case.x)), None
    if mode == "fwd_bwd":
        return (lambda: module(case.x).backward(case.grad)), None
    holder = {}

    def setup():
        _clear_grads(module, case.x)
        holder["y"] = module(case.x)

    return (lambda: holder["y"].backward(case.grad)), setup


def _rotated(names: list[str], i: int) -> list[str]:
    """Round ``i`` of an interleaved run starts ``i`` variants later, so no variant always follows another."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


def time_cpu_interleaved(case: Case, mode: str, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per runnable variant, round-robin so noise hits every variant alike."""
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
            _clear_grads(runnable[name], case.x)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_gpu(case: Case, mode: str, rep_ms: int = 100) -> dict[str, float]:
    """Median milliseconds per runnable variant with ``triton.testing.do_bench`` (events, L2 flushed)."""
    from triton.testing import do_bench

    out = {}
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module):
            continue
        timed, setup = step_fn(module, case, mode)
        if setup is None:
            out[name] = do_bench(timed, rep=rep_ms, grad_to_none=[case.x, *module.parameters()])
        else:  # backward alone: one fresh forward, then time backward with the graph kept
            setup()
            y = module(case.x)
            out[name] = do_bench(lambda y=y: y.backward(case.grad, retain_graph=True), rep=rep_ms,
                                 grad_to_none=[case.x, *module.parameters()])  # fmt: skip
        _clear_grads(module, case.x)
    return out


def graph_replay_ms(timed: Callable[[], None], reps: int = 20) -> float:
    """Median CUDA-event milliseconds of one replay of ``timed`` captured as a CUDA graph: its GPU time with
    the host's share (Python, dispatch, launches) taken out. Warmed up on a side stream, as capture needs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            timed()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        timed()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_rows_values(case: Case) -> dict[str, dict]:
    """Per variant, fwd+bwd as a CUDA-graph replay (``graph_ms``) or why it could not be captured
    (``graph_error``): with ``ms`` from eager timing, how much of a step the host costs."""
    out: dict[str, dict] = {}
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module):
            continue
        timed, _ = step_fn(module, case, "fwd_bwd")
        try:
            out[name] = {"graph_ms": graph_replay_ms(timed)}
        except Exception as exc:  # a variant that cannot be captured (a host sync, a compile) keeps its eager row
            out[name] = {"graph_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.synchronize()
        _clear_grads(module, case.x)
    base = out.get("linear", {}).get("graph_ms")
    for values in out.values():
        if base and "graph_ms" in values:
            values["graph_slowdown_vs_linear"] = values["graph_ms"] / base
    return out


def timing_rows(case: Case, mode: str, rounds: int, graphs: bool = False) -> list[dict]:
    """DESIGN §5 rows (ms, slowdown_vs_linear, speedup_vs_peft) for every variant of ``case``; with ``graphs``
    (CUDA, fwd_bwd), also the CUDA-graph replay time of each."""
    ms = time_gpu(case, mode) if case.device.type == "cuda" else time_cpu_interleaved(case, mode, rounds)
    graph = graph_rows_values(case) if graphs and case.device.type == "cuda" and mode == "fwd_bwd" else {}
    rows = []
    for name, module in case.variants.items():
        if name not in ms:
            rows.append(case.row(mode, name, unavailable=str(module)))
            continue
        row = case.row(mode, name, ms=ms[name], **graph.get(name, {}))
        if "linear" in ms:
            row["slowdown_vs_linear"] = ms[name] / ms["linear"]
        if "peft" in ms and name != "linear":
            row["speedup_vs_peft"] = ms["peft"] / ms[name]
        if "peft_compiled" in ms and name != "linear":
            row["speedup_vs_peft_compiled"] = ms["peft_compiled"] / ms[name]
        rows.append(row)
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
    _clear_grads(module, case.x)
    with _OpCount() as count:
        timed()
    _clear_grads(module, case.x)
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
        _clear_grads(module, case.x)
    return out


def host_overhead_rows(dtype: torch.dtype, device: torch.device, variants: list[str] | None, rounds: int = 200):
    """Per-call cost of one fwd+bwd at a tiny shape (Python dispatch, autograd, small ops, launches), per variant,
    interleaved: ``us`` and ``overhead_us`` above the frozen ``nn.Linear`` at the same shape."""
    tokens, in_f, out_f, r = OVERHEAD_SHAPE
    wanted = [v for v in (variants or all_variants()) if v != "peft_compiled"]  # its compile is not per call
    rows = []
    for p in (0.0, 0.1):
        case = make_case(tokens, in_f, out_f, r, dtype, p, device, wanted)
        ms = time_cpu_interleaved(case, "fwd_bwd", rounds, warmup=20)
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
        from .kernels.triton import adalora_linear as kernels
        from .kernels.triton.aot import launches_stubbed
        from .kernels.triton.config import INTERPRET
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


def auto_choice(case: Case) -> dict:
    """On CUDA, which backend ``auto`` picks for this case (timed once, cached as in training) and what each
    candidate measured, as extra keys for the case's rows; empty where auto has nothing to choose."""
    from .ops.adalora_linear import auto_key, time_backend_ms
    from .ops.backend import auto_choices, measured_choice, runnable

    candidates = runnable(case.device)
    if case.device.type != "cuda" or len(candidates) < 2:
        return {}
    weight = torch.empty(case.out_f, case.in_f, dtype=case.dtype, device="meta")
    key = auto_key(case.x, weight, weight[:, 0], torch.empty(case.r, device="meta"), case.dropout)
    chosen = measured_choice(key, candidates, lambda b: time_backend_ms(b, key, case.device))
    return {"auto_choice": chosen, "auto_candidates_ms": auto_choices()[key][1]}


# --------------------------------------------------------------------------------------------- memory


def saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd keeps for backward of ``module(x)``: ``(all, beyond x)``, parameters and buffers
    excluded, each storage counted once."""
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    x_storage = x.untyped_storage().data_ptr()
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    if not x.is_floating_point():  # token ids: nothing of x is saved beyond them
        x_storage = None
    total = sum(seen.values())
    return total, total - seen.get(x_storage, 0)


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak CUDA memory of one forward+backward above what was allocated before it, after a warm-up call (the
    first call of a shape autotunes the Triton kernels, and the autotuner's timing buffers are no step's)."""
    module(x).backward(grad)
    _clear_grads(module, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).backward(grad)
    torch.cuda.synchronize()
    _clear_grads(module, x)
    return torch.cuda.max_memory_allocated() - base


def memory_rows(case: Case, kept_r: int | None = None) -> list[dict]:
    """saved_bytes (and peak_bytes on CUDA) of every runnable variant; ``kept_r``: ranks left by pruning."""
    rows = []
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module) or name == "peft_compiled":
            continue
        if kept_r is not None:
            _prune(module, kept_r)
        total, beyond_x = saved_bytes(module, case.x)
        extra = {"budget_r": kept_r if kept_r is not None else case.r}
        rows.append(case.row("saved_bytes", name, bytes=total, bytes_beyond_x=beyond_x, **extra))
        if case.device.type == "cuda":
            rows.append(case.row("peak_bytes", name, bytes=peak_bytes(module, case.x, case.grad), **extra))
    return rows


def _prune(module: nn.Module, kept_r: int) -> None:
    with torch.no_grad():
        if isinstance(module, AdaLoRALinear):
            module.rank_mask[kept_r:] = False
            module.lam[kept_r:] = 0
        elif hasattr(module, "lora_E"):
            module.lora_E["default"][kept_r:] = 0


# --------------------------------------------------------------------------------------------- allocator


class _Block(nn.Module):
    def __init__(self, hidden: int, mlp: int, dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "bias": False}
        for name, (i, o) in {
            "q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
            "down_proj": (mlp, hidden),
        }.items():  # fmt: skip
            # the allocator never reads the base weights: allocate them, do not initialise them
            setattr(self, name, nn.utils.skip_init(nn.Linear, i, o, **kw))


MODULE_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def allocator_pair(blocks: int, hidden: int, mlp: int, init_r: int, dtype, device, backends: list[str]):
    """A LLaMA-like adapter set (blocks × q,k,v,o,gate,up,down) under PEFT and under each of our backends,
    with the same weights and gradients, each with its allocator at a masking step."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(*[_Block(hidden, mlp, dtype, device) for _ in range(blocks)])
    ours = nn.ModuleList()  # our layers share the base weights with PEFT's
    for blk in base:
        holder = nn.Module()
        for name in MODULE_NAMES:
            setattr(holder, name, AdaLoRALinear.from_linear(getattr(blk, name), init_r=init_r))
        ours.append(holder)
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=init_r // 2, total_step=1000, tinit=0, tfinal=0, deltaT=1,
                             target_modules=MODULE_NAMES)  # fmt: skip
    pm = peft.get_peft_model(base, cfg)
    for p in pm.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    for blk_i, holder in enumerate(ours):
        for name in MODULE_NAMES:
            svd, layer = getattr(pm.base_model.model[blk_i], name), getattr(holder, name)
            with torch.no_grad():
                for ours_p, peft_p in ((layer.P, svd.lora_B["default"]), (layer.lam, svd.lora_E["default"]),
                                       (layer.Q, svd.lora_A["default"])):  # fmt: skip
                    ours_p.copy_(peft_p.view(ours_p.shape))
                    ours_p.grad = peft_p.grad.view(ours_p.shape).clone()
    allocators = {b: RankAllocator(ours, target_r=init_r // 2, total_step=1000, backend=b) for b in backends}
    return pm, allocators


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
    from .modules import orthogonal_regularization_of

    def per_matrix():
        total = 0
        for P in Ps:
            total = total + torch.norm(P.T @ P - torch.eye(P.shape[1], device=P.device, dtype=P.dtype))
        for Q in Qs:
            total = total + torch.norm(Q @ Q.T - torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype))
        return total / (len(Ps) + len(Qs))

    fns = {"peft": lambda: per_matrix().backward(), "torch": lambda: orthogonal_regularization_of(Ps, Qs).backward()}
    return time_calls(fns, rounds, device)


# --------------------------------------------------------------------------------------------- a whole block


def llama_block(dtype, device, quick: bool):
    """A one-layer LLaMA model built from a config (no download): attention + MLP, our targets inside."""
    from transformers import LlamaConfig, LlamaModel

    hidden = 256 if quick else 1024
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaModel(cfg).to(device=device, dtype=dtype)


def block_memory_rows(dtype, dropout: float, device, quick: bool, init_r: int = 12) -> list[dict]:
    """Bytes saved for backward by a whole LLaMA block, with PEFT's adapters and with each of our backends."""
    import copy

    import peft

    base = llama_block(dtype, device, quick)
    batch, seq = (2, 128) if quick else (4, 512)
    ids = torch.randint(0, 1000, (batch, seq), device=device)
    variants: dict[str, nn.Module] = {}
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=init_r, lora_dropout=dropout, target_modules=MODULE_NAMES,
                             total_step=10)  # fmt: skip
    variants["peft"] = peft.get_peft_model(copy.deepcopy(base), cfg)
    for b in measurable_backends(torch.device(device)):
        ours = copy.deepcopy(base).requires_grad_(False)
        inject_adalora(ours, MODULE_NAMES, init_r=init_r, lora_dropout=dropout, backend=b)
        variants[b] = ours
    hidden = base.config.hidden_size
    rows = []
    for name, model in variants.items():
        model.train()
        total, _ = saved_bytes(model, ids)
        rows.append({
            "op": "saved_bytes", "variant": name, "tokens": batch * seq, "in": hidden, "out": hidden, "r": init_r,
            "dtype": str(dtype).removeprefix("torch."), "dropout": dropout, "bytes": total, "scope": "llama_block",
        })  # fmt: skip
    return rows
