"""Process-group plumbing for torchrun: one process on a laptop, DDP on GPUs and nodes.

Everything degrades to a no-op in a single process, so library code calls these helpers
unconditionally. Ranks come from the environment torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT); the backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError

from clipshift import train_utils as T
from clipshift.config import SECTIONS, DistributedConfig
from clipshift.errors import ClipshiftError, ConfigError
from clipshift.tracking_api import RecordingTracker, replay


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


# --------------------------------------------------------------------------------------------
# launching: one launcher per node, one entry on every rank, for every stage that runs on ranks

# A stage's function every rank calls, by name: every stage imports this module, so it must not
# import them (and the flows pass the function itself to run_stage).
STAGE_ENTRIES = {
    "pretrain": "clipshift.stages.pretrain:run_pretrain",
    "finetune": "clipshift.stages.finetune:run_finetune",
    "evaluate": "clipshift.stages.evaluate:run_evaluate",
}
# How long the nodes' launchers wait for each other at the rendezvous (pods start unevenly).
RDZV_JOIN_TIMEOUT_S = 900


def wants_torchrun(config: Any) -> bool:
    """True when ``config`` (a section with ``distributed``) asks for more than one rank and
    this process is not already one."""
    return config.distributed.world_size > 1 and "RANK" not in os.environ


def torchrun_command(dist: DistributedConfig, rdzv_id: str, rank_args: list[str]) -> list[str]:
    """This node's ``torchrun``, starting ``python -m clipshift.distributed rank <rank_args>`` on
    ``dist.nproc_per_node`` ranks. One node: a standalone rendezvous on a free local port (two
    runs at once cannot clash). Several: a c10d rendezvous at ``dist.rdzv_endpoint``, where
    every node's launcher meets the others (the endpoint's host runs the store) and torchrun
    assigns the global ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={dist.nproc_per_node}", f"--nnodes={dist.nnodes}"]  # fmt: skip
    if dist.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={dist.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=join_timeout={RDZV_JOIN_TIMEOUT_S}",
        ]
    return [*cmd, "--max-restarts=0", "-m", "clipshift.distributed", "rank", *rank_args]


def run_stage(entry: Callable[..., Any], config: Any, tracker: Any = None, **kwargs: Any) -> Any:
    """``entry(config, tracker=tracker, **kwargs)`` (a stage's run function): in this process
    when ``config.distributed`` asks for one rank, else on ranks under torchrun (:func:`launch`).
    Either way the result and what ``tracker`` receives are the same."""
    if wants_torchrun(config):
        return launch(entry, config, tracker, **kwargs)
    return entry(config, tracker=tracker, **kwargs)


def launch(entry: Callable[..., Any], config: Any, tracker: Any = None, **kwargs: Any) -> Any:
    """Run ``entry(config, **kwargs)`` on every rank: this node's ``nproc_per_node`` ranks under
    torchrun, joined by the other nodes' launchers when ``nnodes > 1`` (each runs the same
    launch). Returns rank 0's result on every node, and logs into ``tracker`` what rank 0
    logged, once the ranks end (MLflow then holds what a run in one process gives it).

    ``kwargs`` must be JSON values. The config reaches the ranks as a file; the environment is
    passed through as it is (credentials reach the ranks as they reach this process) and never
    written into the file or the command line."""
    stage = entry.__module__.rsplit(".", 1)[-1]
    dist = config.distributed
    rdzv_id = re.sub(
        r"[^A-Za-z0-9_-]+", "-", "-".join(["clipshift", stage, *map(str, kwargs.values())])
    )
    with tempfile.TemporaryDirectory(prefix="clipshift-ranks-") as tmp:
        config_json, result_json = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_json.write_text(config.model_dump_json())
        rank_args = [
            "--entry", f"{entry.__module__}:{entry.__qualname__}",
            "--config-class", f"{type(config).__module__}:{type(config).__qualname__}",
            "--config-json", str(config_json),
            "--result-json", str(result_json),
            "--kwargs", json.dumps(kwargs),
        ]  # fmt: skip
        cmd = torchrun_command(dist, rdzv_id, rank_args)
        proc = subprocess.run(cmd, env=os.environ.copy(), check=False)
        if proc.returncode != 0 or not result_json.exists():
            nodes = (
                f"; with nnodes={dist.nnodes} every node runs this launch with the same settings "
                f"(python -m clipshift.distributed launch {stage} ...), meeting at "
                f"{dist.rdzv_endpoint}"
                if dist.nnodes > 1
                else ""
            )
            raise ClipshiftError(
                f"torchrun {stage} failed (exit {proc.returncode}); the ranks' errors are above"
                + nodes
            )
        payload = json.loads(result_json.read_text())
    if tracker is not None:
        replay(payload["tracked"], tracker)
    return payload["result"]


def run_on_rank(
    run: Callable[[Any], Any], device: str = "auto", result_json: str | None = None
) -> Any:
    """The body of every rank: join the group, split the cores between the local ranks,
    ``run(tracker)`` with a recording tracker, then hand rank 0's result and recording to every
    node's launcher (local rank 0 writes them to ``result_json``). The thread count and the
    process group are restored and left whatever happens."""
    previous_threads = torch.get_num_threads()
    try:
        info = init_distributed(device)
        if info.device.type == "cpu":
            T.set_threads(info.local_world_size)  # ranks share the cores, not oversubscribe
        recorder = RecordingTracker()
        result = run(recorder)
        mine = {"result": result, "tracked": recorder.dump()} if info.is_main else None
        payload = broadcast_object(mine)  # rank 0's, on every node
        if result_json and info.local_rank == 0:
            text = json.dumps(payload, default=str)
            Path(result_json).write_text(text)
        return payload["result"]
    finally:
        torch.set_num_threads(previous_threads)
        cleanup()


def _named(target: str) -> Any:
    """The object ``"package.module:qualname"`` names."""
    import importlib

    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> int:
    """``python -m clipshift.distributed launch <stage> --config-json <section.json>``: this
    node's launcher (run it on every node when nnodes > 1); ``… rank …`` is what torchrun starts
    on every rank."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m clipshift.distributed", description=main.__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("launch", help="start this node's ranks of a stage")
    node.add_argument("stage", choices=sorted(STAGE_ENTRIES))
    node.add_argument("--config-json", required=True, help="the stage's params.yaml section")
    node.add_argument("--pool", help="pretrain: this pool (default: every pretrain.pools)")
    rank = sub.add_parser("rank", help="one rank (what torchrun starts; not by hand)")
    for flag in ("--entry", "--config-class", "--config-json", "--result-json", "--kwargs"):
        rank.add_argument(flag, required=flag != "--result-json")
    args = parser.parse_args(argv)

    if args.command == "rank":
        config = _named(args.config_class).model_validate_json(Path(args.config_json).read_text())
        entry, kwargs = _named(args.entry), json.loads(args.kwargs)
        run_on_rank(
            lambda tracker: entry(config, tracker=tracker, progress=False, **kwargs),
            getattr(config, "device", "auto"),
            args.result_json,
        )
        return 0

    entry = _named(STAGE_ENTRIES[args.stage])
    try:
        text = Path(args.config_json).read_text()
        config = SECTIONS[args.stage].model_validate_json(text)
    except (OSError, ValidationError) as err:
        print(f"clipshift.distributed: {args.config_json}: {err}", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = [{}]
    if args.stage == "pretrain":
        pools = [args.pool] if args.pool else list(getattr(config, "pools", []))
        runs = [{"pool": pool} for pool in pools]
    try:
        for kwargs in runs:
            print(json.dumps(launch(entry, config, **kwargs), default=str, indent=2))
    except ClipshiftError as err:
        print(f"clipshift.distributed: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from clipshift.distributed import main as _main  # the imported module (the stages' copy)

    raise SystemExit(_main())
