"""Process-group plumbing for torchrun: one process on a laptop, DDP on GPUs and nodes.

Everything degrades to a no-op in a single process, so library code calls these helpers
unconditionally. Ranks come from the environment torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT); the backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
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


# --------------------------------------------------------------------------------------------
# sharding: each rank takes a contiguous run of whole batches


def shard_range(n: int, batch_size: int, rank: int | None = None, world: int | None = None):
    """``range`` of the items rank ``rank`` handles out of ``n``, cut at batch boundaries.

    Cutting at multiples of ``batch_size`` means every batch a rank computes is exactly a
    batch the single process computes, so per-item results are bitwise the same, not merely
    close (matmul blocking depends on the batch); gathering in rank order restores the order.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    batches = -(-n // batch_size)
    lo, hi = (batches * r // world for r in (rank, rank + 1))
    return range(min(lo * batch_size, n), min(hi * batch_size, n))


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0, in rank order (CPU)."""
    parts = all_gather_object(tensor.detach().cpu())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------
# launching: what a flow does when its stage config asks for more than one process


def wants_torchrun(config: Any) -> bool:
    """True when ``config`` asks for several processes and we are not already a rank."""
    return config.nproc_per_node * config.nnodes > 1 and "RANK" not in os.environ


def torchrun_command(
    module: str, config_json: str | os.PathLike, nproc_per_node: int, nnodes: int = 1
) -> list[str]:
    """``torchrun … -m <module> --config-json <file>`` for nproc_per_node × nnodes ranks."""
    return [
        "torchrun",
        f"--nproc_per_node={nproc_per_node}",
        f"--nnodes={nnodes}",
        "-m",
        module,
        "--config-json",
        str(config_json),
    ]


def launch_torchrun(module: str, config: Any, extra_args: list[str] | None = None) -> None:
    """Run ``python -m <module>`` under torchrun on this node with ``config`` (a pydantic
    model with nproc_per_node/nnodes) passed as a JSON file; raise if any rank fails.

    The environment is passed through as it is (credentials reach the ranks the same way they
    reach this process) and never written into the config file or the command line.
    """
    from clipshift.errors import ClipshiftError

    stage = module.rsplit(".", 1)[-1]
    if config.nnodes > 1:
        raise ClipshiftError(
            f"{stage}.nnodes={config.nnodes}: multi-node runs need one launcher per node; "
            "start them with infra/k8s/torchrun-job.yaml (or torchrun --rdzv-endpoint on each "
            "node), or set nnodes: 1"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write(config.model_dump_json())
    try:
        cmd = torchrun_command(module, fh.name, config.nproc_per_node, config.nnodes)
        proc = subprocess.run([*cmd, *(extra_args or [])], env=os.environ.copy(), check=False)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        raise ClipshiftError(
            f"torchrun {stage} failed (exit {proc.returncode}); the ranks' errors are above"
        )


def run_on_rank(run: Callable[[], Any], report: Callable[[Any], Any]) -> int:
    """The body of a stage's torchrun entry point, the same on every rank: join the group,
    split the cores between the local ranks, ``run()``, and print ``report(result)`` on rank 0.
    The thread count and the process group are restored and left whatever happens."""
    import torch

    from clipshift import train_utils as T

    previous_threads = torch.get_num_threads()
    try:
        dist = init_distributed("auto")
        if dist.device.type == "cpu":
            T.set_threads(dist.local_world_size)  # ranks share the cores, not oversubscribe
        result = run()
        if dist.is_main:
            print(report(result))
    finally:
        torch.set_num_threads(previous_threads)
        cleanup()
    return 0
