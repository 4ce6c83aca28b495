"""Pretrain flow: OpenCLIP contrastive training on one pool (DVC runs one per pool)."""

from __future__ import annotations

from prefect import flow

from clipshift.config import PretrainConfig
from clipshift.pretrain import run_pretrain
from flows._common import report_table, tracked_stage


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: PretrainConfig = PretrainConfig(), pool: str = "diverse") -> dict:
    """Train one CLIP on `pool`; resumes from the newest valid checkpoint if one exists."""
    with tracked_stage("pretrain", config, run_name=f"pretrain-{pool}") as tracker:
        tracker.set_tags({"clipshift.pool": pool})
        result = run_pretrain(config, pool, tracker=tracker)
        report_table(
            f"pretrain-{pool}",
            [{k: v for k, v in result.items() if isinstance(v, int | float | str)}],
            f"Pretraining on pool '{pool}'",
        )
        return result
