"""Process-group plumbing for torchrun: one process on a laptop, DDP on GPUs and nodes.

Everything degrades to a no-op in a single process, so library code calls these helpers
unconditionally. Ranks come from the environment torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT); the backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from clipshift.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def local_world_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1" if self.world_size == 1 else "0")) or 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:<local_rank> when a GPU is visible, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but no GPU is visible; set device: "
                "cpu (or auto) in params.yaml, or run on a GPU machine"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes (idempotent); a plain process gets rank 0/1."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (so all ranks take the same decision)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; the input is left as it is)."""
    if not is_initialized():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
