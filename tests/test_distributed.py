"""Data-parallel ODE steps: gloo on the CPU, two processes, one all-reduce of the flat gradients per stage."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from odegan_kernels import FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import mog_pair

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _data(steps):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 128, 2, generator=gen), torch.randn(4, 128, 32, generator=gen)) for _ in range(steps)]


def _train(coupling, penalty, reg, steps, rank=None, world=1, distributed=False):
    D, G = mog_pair(seed=1)
    flat = FlatParams([D, G])
    st = ODEStepper(flat, "rk4", h=0.1, reg=reg, penalty=penalty, coupling=coupling, distributed=distributed)
    for x, z in _data(steps):
        if rank is not None:  # this rank's half of every batch
            x, z = x.chunk(world, dim=1)[rank], z.chunk(world, dim=1)[rank]
        st.step(lambda s, x=x, z=z: game_gradients(D, G, x[s.index], z[s.index], players=s.players, penalty=s.penalty))
    return flat.params.clone()


def _worker(rank, world, port, coupling, penalty, reg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out[rank] = _train(coupling, penalty, reg, 3, rank=rank, world=world, distributed=True)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("coupling,penalty", [("joint", "first_stage"), ("decoupled", "after_step")])
def test_two_ranks_equal_one_process_on_the_whole_batch(coupling, penalty):
    """Without the regulariser, averaging per-rank mean gradients is the full batch's gradient, so two
    ranks on half batches must match one process on the whole batch, and each other."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _worker, args=(2, _free_port(), coupling, penalty, 0.0, out), nprocs=2, join=True, start_method="spawn"
        )
        r0, r1 = out[0], out[1]
    single = _train(coupling, penalty, 0.0, 3)
    assert torch.equal(r0, r1)
    assert torch.allclose(r0, single, rtol=1e-5, atol=1e-6)


def test_regularised_ranks_stay_identical():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _worker,
            args=(2, _free_port(), "decoupled", "after_step", 0.07, out),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        assert torch.equal(out[0], out[1]) and torch.isfinite(out[0]).all()


def test_distributed_needs_an_initialised_group():
    D, G = mog_pair()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ODEStepper(FlatParams([D, G]), distributed=True)
