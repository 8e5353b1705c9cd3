"""Data parallelism: the process group under torchrun, and averaging a flat buffer over the ranks."""

from __future__ import annotations

import os

import torch


def average_across_ranks(buf: torch.Tensor, group=None) -> None:
    """In place: the mean of ``buf`` over the ranks (a sum all-reduce and a division: gloo has no AVG)."""
    import torch.distributed as dist

    dist.all_reduce(buf, group=group)
    buf.div_(dist.get_world_size(group))


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) under torchrun; (0, 1, device) otherwise.

    Initialises the default process group when torchrun's environment asks for one (NCCL on CUDA, gloo on
    the CPU) unless the caller already has; on CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_gather_objects(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order (collective under torchrun; ``[obj]`` in a single process)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    torch.distributed.all_gather_object(objs, obj)
    return objs
