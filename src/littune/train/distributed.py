"""torch.distributed set-up for torchrun: one process per device, gloo on CPU, NCCL on GPU.

Gradients are averaged with one coalesced all-reduce per step (what DDP does), which keeps
gradient accumulation with a global contrastive batch simple and exact.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


#: How long a rank waits for the others at a collective. Long on purpose: ranks legitimately wait
#: for one another while rank 0 trains the tokenizer or while the embedding cache's shards, split
#: unevenly over the ranks, are written (hours for a large source); every process group uses it.
TIMEOUT = timedelta(hours=12)


def init_from_env(device: str | None = "auto") -> tuple[int, int, torch.device]:
    """Initialise the default process group when launched by torchrun; returns (rank, world, device).

    ``device``: ``auto`` (or None) picks CUDA when available; ``cpu``, ``cuda`` or ``cuda:N``
    choose. Under torchrun each rank takes the GPU of its ``LOCAL_RANK`` unless ``cuda:N`` names one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = "auto" if device is None else str(device)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not use_cuda:
        dev = torch.device("cpu")
    else:
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, dev


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device=None) -> bool:
    """``flag`` or-ed over the ranks (one all-reduce; none with one process): every rank gets the same answer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` across ranks, in one flat buffer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
