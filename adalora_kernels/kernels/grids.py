"""How the GPU passes split their work, in plain Python (no Triton import): used by the Triton launchers and by
the traffic ledger (``benchmarking.ledger``), so the ledger counts exactly the partial buffers the launchers make."""

from __future__ import annotations

ROW_TILE = 64  # the row tile the fused route's split counts assume; its kernels take any BLOCK_M
MAX_COLUMN_SPLITS = 8  # the split route's partials over column splits are (splits, M, r): a few
MIN_TILE = 16  # the smallest BLOCK_M / BLOCK_K of any split-route config
FINALIZE_ROWS = 64  # rows per program of the split route's dt finalize (so the count of its dλ partials)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def splits_for(programs: int, length: int, sms: int, min_chunk: int = 256) -> int:
    """The fused route: how many ways to split a reduction of ``length`` so that ``programs`` become about 2 per
    SM, each split keeping at least ``min_chunk`` of the reduction."""
    want = cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, length // min_chunk))


def pass_splits(M: int, length: int, sms: int) -> tuple[int, int]:
    """The split route: (column splits, row splits) of a backward pass over an M × ``length`` tensor, from the shape
    alone (the partial buffers are sized before the autotuner picks a tile): about two programs per SM at any M."""
    col = max(1, min(MAX_COLUMN_SPLITS, cdiv(length, 128)))
    row = max(1, min(cdiv(2 * sms, col), cdiv(M, MIN_TILE)))
    return col, row
