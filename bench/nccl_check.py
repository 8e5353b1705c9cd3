"""Data-parallel ODE steps over NCCL, with the GPUs there are: what `bash bench/gpu_check.sh full` runs as

    torchrun --standalone --nproc-per-node N -m bench.nccl_check [--device cuda|cpu] [--out FILE]

Every rank trains the toy pair on its share of each batch for a few RK4 steps with the flat gradients all-reduced
per stage (ODEStepper(distributed=True)), eagerly and with the whole step captured in a CUDA graph (the all-reduce
inside it). Without the regulariser the mean of per-rank mean gradients is the whole batch's gradient, so every rank
must match one process on the whole batch (as tests/test_distributed.py checks with gloo on a CPU), and the ranks
must agree. With one GPU the group has one rank: NCCL initialises and its all-reduce runs, but nothing is exchanged,
so a collective inside a captured step is not checked by this run (the result says so). --device cpu uses gloo
(the script's own CPU check; no capture there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from odegan_kernels import Batch, FlatParams, ODEStepper, game_gradients
from odegan_kernels.models import mog_pair

STEPS = 3


def train(device, rank=None, world=1, distributed=False, cuda_graph=False) -> torch.Tensor:
    D, G = mog_pair(seed=1)
    D, G = D.to(device), G.to(device)
    flat = FlatParams(D=D, G=G)
    st = ODEStepper(flat, "rk4", h=0.1, reg=0.0, distributed=distributed, cuda_graph=cuda_graph, graph_warmup=1)
    gen = torch.Generator().manual_seed(0)
    full = [(torch.randn(4, 128, 2, generator=gen), torch.randn(4, 128, 32, generator=gen)) for _ in range(STEPS)]
    share = 128 // world
    x = torch.empty(4, share, 2, device=device)  # static inputs, refilled per step (as a captured step needs)
    z = torch.empty(4, share, 32, device=device)
    for xs, zs in full:
        if rank is not None:  # this rank's share of every batch
            xs, zs = xs.chunk(world, dim=1)[rank], zs.chunk(world, dim=1)[rank]
        x.copy_(xs)
        z.copy_(zs)
        st.step(lambda s: game_gradients(D, G, Batch(x[s.index], z[s.index]), players=s.players, penalties=s.penalties))
    if cuda_graph and not st.graph.captured:
        raise RuntimeError("the step was not captured")
    return flat.params.detach().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="append rank 0's result (one JSON line) here")
    args = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ:  # run without torchrun: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    if device.type == "cuda":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    result = {"backend": backend, "world": world, "device": str(device)}
    ok = True
    try:
        eager = train(device, rank, world, distributed=True)
        single = train(device)
        result["eager_vs_one_process"] = rel(eager, single)
        ok &= result["eager_vs_one_process"] <= 1e-5
        gathered = [torch.empty_like(eager) for _ in range(world)]
        dist.all_gather(gathered, eager)
        result["ranks_identical"] = all(torch.equal(g, gathered[0]) for g in gathered)
        ok &= result["ranks_identical"]
        if device.type == "cuda":
            try:
                graphed = train(device, rank, world, distributed=True, cuda_graph=True)
                result["graph_vs_eager"] = rel(graphed, eager)
                ok &= result["graph_vs_eager"] <= 1e-6
            except Exception as exc:
                result["graph"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                ok = False
            if world == 1:
                result["note"] = (
                    "one GPU: a group of one rank; NCCL initialised and all-reduced, but nothing was exchanged, so the "
                    "collective inside a captured step is not checked (it needs two GPUs)"
                )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    result["ok"] = bool(ok)
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
