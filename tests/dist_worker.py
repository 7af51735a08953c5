"""Worker of tests/test_distributed.py: AdaLoRA training under DDP (gloo, CPU), or in one process."""

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import adalora_kernels as ak

STEPS, TOTAL = 10, 8


def model():
    torch.manual_seed(0)
    net = nn.Sequential(ak.AdaLoRALinear(16, 32, init_r=4), nn.Tanh(), ak.AdaLoRALinear(32, 8, init_r=4))
    for layer in (net[0], net[2]):
        nn.init.normal_(layer.lam)
    return net


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(STEPS)]


def train(net, batches, rank=0, world=1):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    layers = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    alloc = ak.RankAllocator(layers, target_r=2, total_step=TOTAL, tinit=1, tfinal=2, deltaT=1)
    for step, (x, y) in enumerate(batches):
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = (net(x[rows]) - y[rows]).square().mean()
        loss.backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    return {"lam": [layers[0].lam.detach(), layers[2].lam.detach()], "pattern": alloc.rank_pattern}


def _run(rank, world, port, out_path, wrap, body=None):
    """Join the 2-rank gloo group, train ``wrap(model())`` (or run ``body(rank, world)``), gather every rank's
    result to ``out_path``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only, whatever the machine's other interfaces
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        if body is not None:
            result = body(rank, world)
        else:
            result = train(wrap(model()), data(), rank, world)
            result["lam"] = [lam.full_tensor() if hasattr(lam, "full_tensor") else lam for lam in result["lam"]]
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out_path)
        dist.barrier()  # no rank tears down while another still talks to rank 0's store
    finally:
        dist.destroy_process_group()


def _fsdp2(net):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # gloo on the CPU, even where CUDA is present
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def ddp_worker(rank, world, port, out_path):
    _run(rank, world, port, out_path, nn.parallel.DistributedDataParallel)


def fsdp2_worker(rank, world, port, out_path):
    _run(rank, world, port, out_path, _fsdp2)


def _allocator_before_fsdp2(rank, world):
    """A RankAllocator built before fully_shard replaced the parameters: its first step says so."""
    net = model()
    alloc = ak.RankAllocator(net, target_r=2, total_step=TOTAL, tinit=1, tfinal=2, deltaT=1)
    net = _fsdp2(net)
    x, y = data()[0]
    (net(x) - y).square().mean().backward()
    try:
        alloc.update_and_allocate(0)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def fsdp2_late_allocator_worker(rank, world, port, out_path):
    _run(rank, world, port, out_path, None, body=_allocator_before_fsdp2)
