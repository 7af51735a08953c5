"""The traffic ledger (DESIGN §4): for each route, every launch of one fwd+bwd with the bytes it reads and writes
and the FLOPs it does, from the shapes alone, and a predicted time from stated ceilings. It is how a design is
judged without a GPU; on a GPU, ``bench --kernels`` sets the profiler's kernel times beside it.

A launch's predicted time is ``max(flops / GEMM rate, bytes / copy bandwidth) + launch cost``: a GEMM at cuBLAS's
rate, a streaming pass at copy bandwidth. Bytes are those the launch must move through device memory (each
operand once; an L2-resident re-read is not counted; atomic additions into an accumulator count as its bytes
once, on the assumption that L2's atomic units keep up with a streaming pass, which the kernel table checks). The
default ceilings are the H200's measured numbers (``benchmarks/results/nvidia-h200-ceilings.json`` holds them with
their sources).

Routes: ``linear`` (the frozen layer), ``peft`` (PEFT's eager ``SVDLinear``), ``torch`` (our composite backend),
``triton`` (the fused route: the base GEMM in Triton with the adapter inside), ``triton_split`` (the split route:
cuBLAS GEMMs, the adapter in streaming passes) and ``csrc`` (the CUDA extension).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..kernels import grids

ROUTES = ("linear", "peft", "torch", "triton", "triton_split", "csrc")
ELEMENT = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

DEFAULT_CEILINGS = {
    "device": "NVIDIA H200",
    # cuBLAS bf16 8192x4096x4096 GEMM: 0.386 ms (nvidia-h200-2026-11-29); 8192^3: 769-798 (device tool's KINDS)
    "gemm_tflops": {"bfloat16": 700.0, "float16": 700.0, "float32": 50.0, "float64": 50.0},
    "copy_gbps": 4300.0,  # a 1 GiB device-to-device copy, bytes read plus written (KINDS.md, 2026-10-28)
    "launch_us": 2.0,  # a kernel's own start inside a CUDA graph (an assumption, checked by the kernel table)
    "sms": 132,
    "arch": 90,  # sm_90: the fused route's GEMMs are the Hopper ones (kernels/triton/hopper.py)
}


@dataclass
class Launch:
    route: str
    phase: str  # fwd | bwd
    kernel: str  # the Triton kernel's name, or what a library call computes
    engine: str  # triton | cublas | aten | csrc
    bytes_read: int
    bytes_written: int
    flops: int
    predicted_us: float = 0.0


@dataclass
class Shape:
    M: int  # tokens
    K: int  # in_features
    N: int  # out_features
    r: int
    dtype: str
    dropout: float
    deterministic: bool = False  # torch.use_deterministic_algorithms: the split route's fixed-order partials

    @property
    def E(self) -> int:
        return ELEMENT[self.dtype]

    @property
    def A(self) -> int:  # the accumulator's bytes
        return 8 if self.dtype == "float64" else 4


class _Book:
    def __init__(self, route: str, shape: Shape) -> None:
        self.route, self.s, self.rows, self.phase = route, shape, [], "fwd"

    def add(self, kernel: str, engine: str, read: float, written: float, flops: float = 0) -> None:
        self.rows.append(Launch(self.route, self.phase, kernel, engine, int(read), int(written), int(flops)))

    def gemm(self, what: str, m: int, n: int, k: int, c_read: bool = False, engine: str = "cublas") -> None:
        """An m×n output over k, operands in the layer's dtype; ``c_read``: beta = 1 (the output is read too)."""
        E = self.s.E
        self.add(what, engine, E * (m * k + k * n + (m * n if c_read else 0)), E * m * n, 2 * m * n * k)

    def elementwise(self, what: str, n_read: float, n_written: float, size: int | None = None) -> None:
        size = size or self.s.E
        self.add(what, "aten", size * n_read, size * n_written)


def _base_forward(b: _Book) -> None:
    s = b.s
    b.gemm("addmm: y = x Wᵀ + b", s.M, s.N, s.K)


def _linear(b: _Book) -> None:
    s = b.s
    _base_forward(b)
    b.phase = "bwd"
    b.gemm("mm: dx = g W", s.M, s.K, s.N)


def _peft(b: _Book) -> None:
    s = b.s
    M, K, N, r, E = s.M, s.K, s.N, s.r, s.E
    _base_forward(b)
    if s.dropout > 0:
        b.add("native_dropout: x", "aten", E * M * K, E * M * K + M * K)  # the dropped copy and a bool mask
    b.elementwise("mul: A * E", r * K + r, r * K)
    b.gemm("mm: drop(x) (A*E)ᵀ", M, r, K)
    b.gemm("mm: · Bᵀ", M, N, r)
    b.elementwise("mul: · scaling", M * N, M * N)
    b.elementwise("div: / ranknum", M * N, M * N)
    b.elementwise("add_: result +=", 2 * M * N, M * N)
    b.phase = "bwd"
    b.elementwise("div backward", M * N, M * N)
    b.elementwise("mul backward", M * N, M * N)
    b.gemm("mm: d(x Aᵀ) = g' B", M, r, N)
    b.gemm("mm: dB = g'ᵀ (x Aᵀ)", N, r, M)
    b.gemm("mm: d drop(x) = · (A*E)", M, K, r)
    b.gemm("mm: d(A*E) = ·ᵀ drop(x)", r, K, M)
    b.elementwise("mul backward: dA, dE", 3 * r * K, 2 * r * K)
    if s.dropout > 0:
        b.add("native_dropout_backward", "aten", E * M * K + M * K, E * M * K)
    _linear_backward(b)
    b.elementwise("add: dx = dx_base + dx_adapter", 2 * M * K, M * K)


def _linear_backward(b: _Book) -> None:
    s = b.s
    b.gemm("mm: dx = g W", s.M, s.K, s.N)


def _torch_kept(b: _Book) -> None:
    """The torch backend's dropped input on CUDA: the Philox keep-mask (the Triton mask kernel, a byte per
    element), then ``x ⊙ keep`` reading the byte mask as it goes (``1 / (1 - p)`` is the next GEMM's alpha)."""
    s = b.s
    MK = s.M * s.K
    b.add("_keep_mask_kernel: Philox mask", "triton", 0, MK)
    b.add("mul: x ⊙ keep", "aten", (s.E + 1) * MK, s.E * MK)


def _torch(b: _Book) -> None:
    s = b.s
    M, K, N, r, E = s.M, s.K, s.N, s.r, s.E
    drop = s.dropout > 0
    if drop:
        _torch_kept(b)
    b.gemm("addmm: t = s · (x ⊙ keep) Qᵀ" if drop else "mm: t = x Qᵀ", M, r, K)
    _base_forward(b)
    b.elementwise("mul: t λ", M * r, M * r)
    b.gemm("addmm_: y += (t λ) Pᵀ", M, N, r, c_read=True)
    b.phase = "bwd"
    b.gemm("mm: dt = g P", M, r, N)
    b.elementwise("mul: u = dt λ", M * r, M * r)
    if drop:
        b.add("_keep_mask_kernel: Philox mask", "triton", 0, M * K)
    _linear_backward(b)
    if drop:
        b.gemm("mm: u Q", M, K, r)
        b.add("addcmul_: dx += s · (u Q) ⊙ keep", "aten", (2 * E + 1) * M * K, E * M * K)
    else:
        b.gemm("addmm_: dx += u Q", M, K, r, c_read=True)
    b.elementwise("mul: t λ", M * r, M * r)
    b.gemm("mm: dP = gᵀ (t λ)", N, r, M)
    b.elementwise("mul, sum: dλ", 2 * M * r, r)
    if drop:
        b.add("mul: x ⊙ keep", "aten", (E + 1) * M * K, E * M * K)
    b.gemm("addmm: dQ = s · uᵀ (x ⊙ keep)" if drop else "mm: dQ = uᵀ x", r, K, M)


def _triton(b: _Book, sms: int, arch: int) -> None:
    """The fused route; from sm_90 its two GEMMs are hopper.py's (the same operands and bytes, through TMA)."""
    s = b.s
    hopper = arch >= 90
    fwd_gemm = "_tma_fwd_kernel" if hopper else "_fused_fwd_kernel"
    dx_gemm = "_tma_dx_kernel" if hopper else "_fused_dx_bwd_kernel"
    M, K, N, r, E, A = s.M, s.K, s.N, s.r, s.E, s.A
    splits = grids.splits_for(grids.cdiv(M, grids.ROW_TILE), K, sms)
    b.add("_shrink_fwd_kernel", "triton", E * (M * K + r * K), (A * splits if splits > 1 else E) * M * r, 2 * M * K * r)
    if splits > 1:
        b.add("sum, copy_: t from partials", "aten", A * splits * M * r, E * M * r)
    b.add(fwd_gemm, "triton", E * (M * K + N * K + M * r + N * r + N), E * M * N,
          2 * M * N * K + 2 * M * N * r)  # fmt: skip
    b.phase = "bwd"
    b.add("zeros: dλ partials", "aten", 0, A * grids.cdiv(M, 16) * r)
    b.add("_dt_bwd_kernel", "triton", E * (M * N + N * r + M * r), A * M * r, 2 * M * N * r)
    b.add(dx_gemm, "triton", E * (M * N + N * K + r * K) + A * M * r, E * M * K,
          2 * M * K * N + 2 * M * K * r)  # fmt: skip
    for what, length, width in (("dQ", K, K), ("dPᵀ", N, N)):
        parts = grids.splits_for(grids.cdiv(length, grids.ROW_TILE), M, sms)
        b.add(f"_rank_reduce_bwd_kernel ({what})", "triton", E * M * width + A * M * r,
              (A * parts if parts > 1 else E) * r * width, 2 * M * width * r)  # fmt: skip
        if parts > 1:
            b.add(f"sum, copy_: {what} from partials", "aten", A * parts * r * width, E * r * width)
    b.add("sum: dλ partials", "aten", A * grids.cdiv(M, 16) * r, A * r)


def _triton_split(b: _Book, sms: int) -> None:
    """The split route. Its backward's split reductions: one zeroed accumulator each, added into with atomics (one
    memset, no partial buffers, no launch between the passes), or, where deterministic algorithms are on, a partial
    per split summed in a fixed order."""
    s = b.s
    M, K, N, r, E, A = s.M, s.K, s.N, s.r, s.E, s.A
    b.add(
        "_split_fwd_kernel",
        "triton",
        E * (M * K + r * K + N * r + N),
        E * (M * r + M * N),
        2 * M * K * r + 2 * M * N * r,
    )
    b.gemm("addmm_: y += x Wᵀ", M, N, K, c_read=True)
    b.phase = "bwd"
    col, row = grids.pass_splits(M, N, sms)
    _, row_x = grids.pass_splits(M, K, sms)
    if s.deterministic:
        blocks = grids.cdiv(M, grids.FINALIZE_ROWS)
        dt_parts, dp_parts, dq_parts, dlam_parts = col * M * r, row * r * N, row_x * r * K, blocks * r
    else:
        dt_parts, dp_parts, dq_parts, dlam_parts = M * r, r * N, r * K, r
        b.add("zeros: dt, dPᵀ, dQ, dλ accumulators", "aten", 0, A * (M * r + r * (N + K + 1)))
    b.add("_split_g_bwd_kernel", "triton", E * (M * N + N * r + M * r), A * (dt_parts + dp_parts), 4 * M * N * r)
    if s.deterministic:
        b.add("_split_dt_finalize_kernel", "triton", A * dt_parts + E * M * r, A * (M * r + dlam_parts),
              3 * col * M * r)  # fmt: skip
    b.add("_split_x_bwd_kernel", "triton", E * (M * K + r * K) + A * M * r, E * M * K + A * dq_parts, 4 * M * K * r)
    b.gemm("addmm_: dx += g W", M, K, N, c_read=True)
    b.add("_split_finalize_kernel", "triton", A * (dq_parts + dp_parts + dlam_parts), E * (r * K + r * N + r),
          dq_parts + dp_parts + dlam_parts)  # fmt: skip


def _csrc(b: _Book) -> None:
    """The CUDA extension's split route (csrc/cuda/binding.cpp): every GEMM in cuBLAS, the two big ones in place
    onto what the adapter wrote; with dropout, one pass writes drop(x) for cuBLAS (again in the backward, for
    dQ); the adapter's share of dx in one pass (masked_expand)."""
    s = b.s
    M, K, N, r, E, A = s.M, s.K, s.N, s.r, s.E, s.A

    def dropped() -> None:
        if s.dropout > 0:
            b.add("dropout_scale_kernel", "csrc", E * M * K, E * M * K)

    dropped()
    b.gemm("mm: t = drop(x) Qᵀ", M, r, K)
    b.elementwise("mul: t λ", M * r, M * r)
    b.gemm("addmm: y₀ = b + (t λ) Pᵀ", M, N, r)
    b.gemm("addmm_: y += x Wᵀ", M, N, K, c_read=True)
    b.phase = "bwd"
    b.gemm("mm: dt = g P", M, r, N)
    b.add("masked_expand_kernel", "csrc", E * (M * r + r * K + r), E * M * K, 2 * M * K * r + M * r)
    b.gemm("addmm_: dx += g W", M, K, N, c_read=True)
    dropped()
    b.elementwise("mul: u = dt λ", M * r, M * r)
    b.gemm("mm: dQ = uᵀ drop(x)", r, K, M)
    b.elementwise("mul: t λ", M * r, M * r)
    b.gemm("mm: dP = gᵀ (t λ)", N, r, M)
    b.add("to: dt in float", "aten", E * M * r, A * M * r)
    b.add("mul: dt t", "aten", (A + E) * M * r, A * M * r)
    b.add("sum: dλ", "aten", A * M * r, A * r)
    b.add("to: dλ", "aten", A * r, E * r)


def launches(route: str, shape: Shape, ceilings: dict | None = None) -> list[Launch]:
    """Every launch of one fwd+bwd of ``route`` at ``shape`` (x and the adapters requiring grad, the base frozen),
    each with its predicted µs under ``ceilings`` (default: the H200's)."""
    if route not in ROUTES:
        raise ValueError(f"route: expected one of {ROUTES}, got {route!r}")
    c = {**DEFAULT_CEILINGS, **(ceilings or {})}
    book = _Book(route, shape)
    if route == "linear":
        _linear(book)
    elif route == "peft":
        _peft(book)
    elif route == "torch":
        _torch(book)
    elif route == "triton":
        _triton(book, c["sms"], c["arch"])
    elif route == "triton_split":
        _triton_split(book, c["sms"])
    else:
        _csrc(book)
    rate = c["gemm_tflops"][shape.dtype] * 1e12
    for row in book.rows:
        compute = row.flops / rate
        traffic = (row.bytes_read + row.bytes_written) / (c["copy_gbps"] * 1e9)
        row.predicted_us = max(compute, traffic) * 1e6 + c["launch_us"]
    return book.rows


def ledger_rows(shape: Shape, routes=ROUTES, ceilings: dict | None = None) -> list[dict]:
    """Results rows: one ``op: "ledger"`` row per launch, then one ``op: "ledger_total"`` row per route with
    ``predicted_ms`` and ``predicted_slowdown_vs_linear``."""
    base = {"tokens": shape.M, "in": shape.K, "out": shape.N, "r": shape.r, "dtype": shape.dtype,
            "dropout": shape.dropout, "deterministic": shape.deterministic}  # fmt: skip
    per_route = {route: launches(route, shape, ceilings) for route in routes}
    linear_ms = sum(x.predicted_us for x in launches("linear", shape, ceilings)) / 1e3
    rows = []
    for route, found in per_route.items():
        for launch in found:
            row = asdict(launch)
            rows.append({"op": "ledger", "variant": row.pop("route"), **base, **row})
        total = sum(x.predicted_us for x in found) / 1e3
        moved = sum(x.bytes_read + x.bytes_written for x in found)
        rows.append({"op": "ledger_total", "variant": route, **base, "launches": len(found), "predicted_ms": total,
                     "bytes": moved, "flops": sum(x.flops for x in found),
                     "predicted_slowdown_vs_linear": total / linear_ms})  # fmt: skip
    return rows
