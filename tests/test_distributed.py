"""DDP: two gloo ranks on the CPU end with the same λ and rank pattern, equal to one process on the whole batch."""

import socket
import time

import dist_worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_with_single_process(tmp_path):
    out = tmp_path / "ranks.pt"
    ctx = mp.start_processes(dist_worker.ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    ranks = torch.load(out)
    single = dist_worker.train(dist_worker.model(), dist_worker.data())
    assert ranks[0]["pattern"] == ranks[1]["pattern"] == single["pattern"]
    assert ranks[0]["pattern"] is not None and sum(map(sum, single["pattern"].values())) <= 4
    for a, b, s in zip(ranks[0]["lam"], ranks[1]["lam"], single["lam"]):
        assert torch.equal(a, b)  # every rank holds the same λ
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)  # as one process on the concatenated batch
