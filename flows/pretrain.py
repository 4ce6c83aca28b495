"""Pretrain flow: OpenCLIP contrastive training on one pool (DVC runs one per pool).

With ``nproc_per_node > 1`` the flow launches the trainer under ``torchrun`` (DDP: gloo on
CPU, nccl on GPU) and logs the rank-0 history to MLflow when it ends; multi-node runs are
started by the launcher of each node (see infra/k8s/torchrun-job.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift.checkpoints import config_path
from clipshift.config import PretrainConfig
from clipshift.stages.pretrain import run_path, run_pretrain
from flows._common import report_table, tracked_stage


def launch_torchrun(config: PretrainConfig, pool: str, tracker) -> dict:
    """Train under torchrun, then log rank 0's history to this flow's MLflow run."""
    out = run_path(config, pool)
    before = _stamp(out / "metrics.json")
    D.launch_torchrun("clipshift.stages.pretrain", config, ["--pool", pool, "--no-progress"])
    result = json.loads((out / "metrics.json").read_text())
    if before is not None and _stamp(out / "metrics.json") == before:
        # the ranks found a finished run with an identical training spec and left it as it was
        tracker.set_tags({"clipshift.reused": "true"})
        return {**result, "reused": True}
    for record in json.loads((out / "history.json").read_text()):
        step = int(record.get("step", 0))
        tracker.log_metrics(
            {k: float(v) for k, v in record.items() if isinstance(v, int | float)}, step=step
        )
    return result


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime): metrics.json is replaced atomically by every run that trains."""
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: PretrainConfig = PretrainConfig(), pool: str = "diverse") -> dict:
    """Train one CLIP on `pool`; resumes from the newest valid checkpoint if one exists."""
    with tracked_stage("pretrain", config, run_name=f"pretrain-{pool}") as tracker:
        tracker.set_tags({"clipshift.pool": pool})
        if D.wants_torchrun(config):
            result = launch_torchrun(config, pool, tracker)
        else:
            result = run_pretrain(config, pool, tracker=tracker)
        checkpoint = Path(result.get("checkpoint", run_path(config, pool) / "checkpoint.pt"))
        if checkpoint.exists():
            tracker.log_artifact(checkpoint, "checkpoint")
            tracker.log_artifact(config_path(checkpoint, result["model"]), "checkpoint")
        report_table(
            f"pretrain-{pool}",
            [{k: v for k, v in result.items() if isinstance(v, int | float | str)}],
            f"Pretraining on pool '{pool}'",
        )
        return result
