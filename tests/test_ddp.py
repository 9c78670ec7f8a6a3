"""Data-parallel training: DDP over two CPU processes gives the gradients of one process on the whole batch.

Every sample freezes once it converges, so a sample's solution (and gradient) does not depend on
which other samples share its batch — which is what makes sharding exact.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import implicitlayers as il

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inject = torch.nn.Linear(6, 8).double()
        self.weight = torch.nn.Linear(8, 8, bias=False).double()
        torch.nn.init.normal_(self.weight.weight, std=0.3 / 8**0.5)
        self.head = torch.nn.Linear(8, 3).double()
        self.deq = il.DEQ(self.cell, solver=il.Anderson(tol=1e-10, max_iter=200))

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.weight(z) + u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # Gloo otherwise binds to whatever the host name resolves to, which on a sandboxed CI machine
        # may be an address the two processes cannot reach: talk over loopback only.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    open(os.path.join(out_dir, f"joined{rank}"), "w").close()
    try:
        model = torch.nn.parallel.DistributedDataParallel(Classifier())
        x, y = _data()
        shard = slice(rank * 8, (rank + 1) * 8)
        loss = torch.nn.functional.cross_entropy(model(x[shard]), y[shard])
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.module.parameters()]
        # Write then rename, so the parent never reads a half-written file.
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.part"))
        os.replace(os.path.join(out_dir, f"grads{rank}.part"), os.path.join(out_dir, f"grads{rank}.pt"))
        # Leave together: a rank tearing down while the other still talks to it can hang gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_workers(out_dir: str, deadline_s: float = 180.0) -> None:
    """Run both ranks; never wait past `deadline_s` (a hung rendezvous must not hang the suite)."""
    context = mp.start_processes(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    outputs = [os.path.join(out_dir, f"grads{rank}.pt") for rank in range(2)]
    while not context.join(timeout=1.0):
        if all(map(os.path.exists, outputs)):
            # The results are written; do not depend on the process group's teardown, which has been
            # seen to hang on some machines after both ranks finished.
            if not context.join(timeout=10.0):
                for process in context.processes:
                    process.kill()
            return
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            if not all(os.path.exists(os.path.join(out_dir, f"joined{rank}")) for rank in range(2)):
                pytest.skip("two gloo processes could not rendezvous over loopback on this machine")
            pytest.fail(f"the DDP workers joined the process group but did not finish within {deadline_s:.0f} s")


def test_ddp_gradients_equal_single_process_gradients_on_the_full_batch(tmp_path):
    _run_two_workers(str(tmp_path))
    model = Classifier()
    x, y = _data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    reference = [p.grad for p in model.parameters()]
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for g, ref in zip(grads, reference):
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
