"""Pretrain flow: OpenCLIP contrastive training on one pool (DVC runs one per pool).

With ``distributed`` asking for several ranks the trainer runs under torchrun (DDP: gloo on
CPU, nccl on GPU; :func:`clipshift.distributed.run_stage`) and rank 0's history reaches MLflow
when it ends; with several nodes every node runs the same launch (infra/k8s/torchrun-job.yaml).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift.config import PretrainConfig
from clipshift.stages.pretrain import run_path, run_pretrain
from flows._common import report_table, tracked_stage


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: PretrainConfig = PretrainConfig(), pool: str = "diverse") -> dict:
    """Train one CLIP on `pool`; resumes from the newest valid checkpoint if one exists."""
    with tracked_stage("pretrain", config, run_name=f"pretrain-{pool}") as tracker:
        tracker.set_tags({"clipshift.pool": pool})
        result = D.run_stage(run_pretrain, config, tracker, pool=pool)
        checkpoint = Path(result.get("checkpoint", run_path(config, pool) / "checkpoint.pt"))
        if checkpoint.exists():
            tracker.log_artifact(checkpoint, "checkpoint")
            tracker.log_artifact(f"{checkpoint}.config.json", "checkpoint")
        report_table(
            f"pretrain-{pool}",
            [{k: v for k, v in result.items() if isinstance(v, int | float | str)}],
            f"Pretraining on pool '{pool}'",
        )
        return result
