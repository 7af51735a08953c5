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


def run_ranks(out, seconds: float, worker=dist_worker.ddp_worker) -> bool:
    """Two spawned gloo ranks on a fresh localhost port; False if they have not finished in ``seconds``."""
    ctx = mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                return False
    except mp.ProcessExitedException:
        # gloo may abort a rank while tearing down; what is tested was gathered and written before that
        if not out.exists():
            raise
    return True


def test_ddp_ranks_agree_with_single_process(tmp_path):
    out = tmp_path / "ranks.pt"
    # a localhost rendezvous can stall on a busy machine (a port taken between bind and use): one retry
    if not run_ranks(out, 60) and not run_ranks(out, 60):
        pytest.fail("two attempts at the 2-rank DDP run did not finish within 60 s each")
    ranks = torch.load(out)
    single = dist_worker.train(dist_worker.model(), dist_worker.data())
    assert ranks[0]["pattern"] == ranks[1]["pattern"] == single["pattern"]
    assert ranks[0]["pattern"] is not None and sum(map(sum, single["pattern"].values())) <= 4
    for a, b, s in zip(ranks[0]["lam"], ranks[1]["lam"], single["lam"]):
        assert torch.equal(a, b)  # every rank holds the same λ
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)  # as one process on the concatenated batch


def test_fsdp2_ranks_agree_with_single_process(tmp_path):
    """FSDP2 (fully_shard) on the CPU with gloo: sharded λ, P, Q; every rank scores and masks the same way."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    out = tmp_path / "ranks.pt"
    if not run_ranks(out, 60, dist_worker.fsdp2_worker) and not run_ranks(out, 60, dist_worker.fsdp2_worker):
        pytest.fail("two attempts at the 2-rank FSDP2 run did not finish within 60 s each")
    ranks = torch.load(out, weights_only=False)
    single = dist_worker.train(dist_worker.model(), dist_worker.data())
    assert ranks[0]["pattern"] == ranks[1]["pattern"] == single["pattern"]
    for a, b, s in zip(ranks[0]["lam"], ranks[1]["lam"], single["lam"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)


def test_an_allocator_built_before_fsdp2_says_so(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    out, worker = tmp_path / "ranks.pt", dist_worker.fsdp2_late_allocator_worker
    if not run_ranks(out, 60, worker) and not run_ranks(out, 60, worker):
        pytest.fail("two attempts at the 2-rank FSDP2 run did not finish within 60 s each")
    for rank in torch.load(out):
        assert rank["error"] == (
            "0: its adapter parameters were sharded (FSDP) after this allocator was built; build the RankAllocator "
            "after wrapping the model"
        )


def test_deepspeed_zero3_parameters_are_refused():
    import adalora_kernels as ak

    model = torch.nn.Sequential(ak.AdaLoRALinear(8, 8, init_r=4))
    model[0].Q.ds_id = 3  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(ValueError, match=r"0\.Q: DeepSpeed ZeRO-3 partitions this parameter; .* use ZeRO stage 1 or 2"):
        ak.RankAllocator(model, target_r=2, total_step=10)


def test_fsdp1_flat_parameters_are_refused():
    import adalora_kernels as ak

    class FullyShardedDataParallel(torch.nn.Module):  # stands in for FSDP1's wrapper, which needs a process group
        _use_orig_params = False

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model = FullyShardedDataParallel(torch.nn.Sequential(ak.AdaLoRALinear(8, 8, init_r=4)))
    with pytest.raises(ValueError, match=r"FSDP1 with flattened parameters \(use_orig_params=False\); wrap it with"):
        ak.RankAllocator(model, target_r=2, total_step=10)
    model._use_orig_params = True
    ak.RankAllocator(model, target_r=2, total_step=10)
