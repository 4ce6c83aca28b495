"""Finetune flow: zero-shot heads, end-to-end fine-tunes, linear probe, k-NN, baselines.

With ``distributed`` asking for several ranks the stage runs under torchrun (the end-to-end
fine-tunes and baselines train with DDP; :func:`clipshift.distributed.run_stage`) and what
rank 0 logged reaches MLflow when it ends.

Training times are not in ``models/finetune`` (a DVC output): the flow writes them to
``metrics/finetune.json`` (DVC metrics, not cached) and MLflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift import logged_models
from clipshift.config import FinetuneConfig
from clipshift.stages.finetune import run_finetune
from flows._common import publish_metrics, report_table, tracked_stage

METRICS = "metrics/finetune.json"


@flow(name="finetune", log_prints=True)
def finetune_flow(config: FinetuneConfig = FinetuneConfig()) -> dict:
    """Adapt the pretrained CLIPs to the reference task and train the baseline models."""
    with tracked_stage("finetune", config) as tracker:
        result = D.run_stage(run_finetune, config, tracker)
        seconds = result.get("train_seconds") or {}
        publish_metrics(tracker, METRICS, {"train_seconds": seconds})
        out = Path(config.out_dir)
        logged_models.log_index(tracker, out, out.parent, config.pretrain_dir)
        rows = [
            {"model": mid, **info, "train_seconds": seconds.get(mid)}
            for mid, info in result.get("models", {}).items()
        ]
        report_table("finetune-models", rows, "Models written by finetune")
        return result
