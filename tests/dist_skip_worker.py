"""Two ranks (gloo, CPU) with sharded DTensor parameters: skip_nonfinite must decide alike on every rank.

Run by tests/test_reliability_distributed.py as a script. The NaN sits in rank 1's shard only; without the
all-reduce of the flag, rank 0 would update and rank 1 would not, and the replicas would part.
Each rank checks its shards against a single-process run on plain tensors; exit code 0 on success.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import leave_rank, watch_rank

SHAPES = [(6,), (5, 3)]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    if step == 1:
        out[1][4, 2] = float("nan")  # row 4 of 5: rank 1's shard under Shard(0)
    return out


def _run(params, opt, to_param) -> None:
    for step in range(3):
        for p, g in zip(params, _grads(step)):
            p.grad = to_param(g)
        opt.step()


def _rank(rank: int, port: int) -> None:
    watch_rank(300)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from triton_adadelta import Adadelta

        mesh = init_device_mesh("cpu", (2,))
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(s, generator=gen) for s in SHAPES]
        plain = [p.clone() for p in full]
        sharded = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in full]
        opt = Adadelta(sharded, fused=False, skip_nonfinite=True)
        _run(sharded, opt, lambda g: distribute_tensor(g, mesh, [Shard(0)]))
        ref = Adadelta(plain, fused=False, skip_nonfinite=True)
        _run(plain, ref, lambda g: g)
        assert int(opt.skipped_steps) == 1 == int(ref.skipped_steps), (rank, int(opt.skipped_steps))
        for p, q in zip(sharded, plain):
            assert torch.equal(p.full_tensor(), q), f"rank {rank}: sharded run differs from the plain run"
            assert float(opt.state[p]["step"]) == 2
    finally:
        dist.destroy_process_group()
    leave_rank()  # the checks passed; the DTensors and the mesh still hold the destroyed group


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
