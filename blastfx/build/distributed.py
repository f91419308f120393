"""Several processes, one compressed model: the factorization split over the ranks of a
``torch.distributed`` process group.

Why: fitting the structures is most of a compress on a GPU (each layer an SVD warm start and tens of
alternating least-squares solves), and layers are independent given their statistics. Under
``torchrun --nproc-per-node N`` (or any initialized process group, NCCL on GPUs, gloo on CPUs) every
rank plans the same layers from the same calibration data, fits its share of the work units (a
unit: same-shape layers fitted as one batched problem), and receives the others' layers by
broadcast from their owners, so every rank ends with the same compressed model. Shares are
balanced by cost (longest first onto the least-loaded rank), deterministically, so every rank
computes the same assignment without talking.
"""
from __future__ import annotations

import contextlib
import heapq
import os

import torch
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign(costs: list[float], ranks: int) -> list[int]:
    """The rank fitting each unit: longest first onto the least-loaded rank (ties: the lower rank)."""
    loads = [(0.0, r) for r in range(ranks)]
    heapq.heapify(loads)
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, r = heapq.heappop(loads)
        owner[k] = r
        heapq.heappush(loads, (load + costs[k], r))
    return owner


def share(built: dict[str, nn.Module], owners: dict[str, int], empty) -> dict[str, nn.Module]:
    """Every rank's ``built`` modules on every rank: for each layer (in name order, the same on all
    ranks), the ranks that did not fit it make ``empty(name)`` and receive its tensors from its owner."""
    rank, _ = world()
    out = {}
    for name in sorted(owners):
        module = built[name] if owners[name] == rank else empty(name)
        with torch.no_grad():
            for _, tensor in sorted(module.state_dict(keep_vars=True).items()):   # key order, not creation order
                data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
                torch.distributed.broadcast(data, src=owners[name])
        out[name] = module
    return out


def same_everywhere(module: nn.Module, enabled: bool = True) -> None:
    """Every rank's ``module`` parameters set to rank 0's, in place: for work every rank does on its
    own (block reconstruction's optimizer steps), whose rounding may differ between GPUs."""
    _, ranks = world()
    if not enabled or ranks == 1:
        return
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            torch.distributed.broadcast(p.data, src=0)


@contextlib.contextmanager
def launched_group(backend: str = "gloo"):
    """The process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), set up for
    the block and torn down after; outside torchrun, or in a group the caller already set up,
    nothing. gloo by default, because the CLI holds the model on the CPU; with NCCL in ``backend``
    (e.g. "cpu:gloo,cuda:nccl": CPU tensors over gloo, GPU tensors over NCCL) each process takes the
    GPU of its ``LOCAL_RANK``."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
