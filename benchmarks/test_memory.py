"""Bytes saved for backward per layer, recorded in extra_info (the timing is of the measurement itself)."""

import pytest
from conftest import DEVICE, DTYPE, SHAPE

from adalora_kernels import benchmarking as bm


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("r", [4, 16, 64])
def test_saved_bytes(benchmark, r, dropout):
    case = bm.make_case(*SHAPE, r, DTYPE, dropout, DEVICE, ["peft", "torch"])
    rows = benchmark.pedantic(lambda: bm.memory_rows(case), rounds=1)
    for row in rows:
        benchmark.extra_info[f"{row['variant']}_{row['op']}"] = row["bytes"]
        benchmark.extra_info[f"{row['variant']}_beyond_x"] = row.get("bytes_beyond_x")
    ours, peft = (next(r["bytes_beyond_x"] for r in rows if r["variant"] == v) for v in ("torch", "peft"))
    if dropout:
        assert peft >= 5 * ours
