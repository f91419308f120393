"""Long-lived kernel state (workspaces, counters, group tables), allocated outside CUDA-graph pools.

Why: ``torch.compile(mode="reduce-overhead")`` runs a graph's first calls (warm-up and recording)
with every allocation on its stream routed to the graph's private memory pool, and refuses a
recording that leaves live tensors in that pool which are not the graph's outputs ("tensors in the
cudagraph pool not tracked as outputs"). State that outlives one call and is first needed inside a
compiled region (a grouped call is only ever seen compiled) is therefore allocated from a worker
thread on a side stream, which the pool does not claim, and is ready before the caller uses it.
"""
from __future__ import annotations

import threading

import torch

_SIDE_STREAMS: dict = {}


def allocate_state(make, device: torch.device):
    """``make()`` (which allocates and fills tensors on ``device``) run so that its tensors live in
    the ordinary caching allocator, not in a CUDA-graph pool: on a worker thread and a side stream
    (the pool claims the allocations of the compiling thread). During a stream capture nothing can
    be moved off the capturing stream, so ``make()`` runs as it is (the graph then owns the memory,
    as any allocation made while capturing)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.setdefault(index, torch.cuda.Stream(index))
    side.wait_stream(torch.cuda.current_stream(index))
    result, error = [], []

    def work():
        try:
            with torch.cuda.device(index), torch.cuda.stream(side):
                result.append(make())
            side.synchronize()
        except BaseException as e:          # re-raised on the caller's thread
            error.append(e)

    worker = threading.Thread(target=work, name="blastfx-state")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
