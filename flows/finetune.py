"""Finetune flow: zero-shot heads, end-to-end fine-tunes, linear probe, k-NN, baselines.

With ``nproc_per_node > 1`` the flow launches the stage under ``torchrun`` (the end-to-end
fine-tunes and baselines train with DDP) and logs rank 0's summary to MLflow when it ends.

Training times are not in ``models/finetune`` (a DVC output): the flow writes them to
``metrics/finetune.json`` (DVC metrics, not cached) and MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift.config import FinetuneConfig
from clipshift.stages.finetune import run_finetune
from flows._common import publish_metrics, report_table, tracked_stage

METRICS = "metrics/finetune.json"


def launch_torchrun(config: FinetuneConfig, tracker) -> dict:
    """Fine-tune under torchrun, then log rank 0's results to this flow's MLflow run."""
    fd, timings_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        args = ["--no-progress", "--timings-json", timings_path]
        D.launch_torchrun("clipshift.stages.finetune", config, args)
        train_seconds = json.loads(Path(timings_path).read_text() or "{}")
    finally:
        os.unlink(timings_path)
    summary = json.loads((Path(config.out_dir) / "finetune.json").read_text())
    accuracies = {
        f"val_accuracy/{mid}": float(m["val_accuracy"])
        for mid, m in summary["models"].items()
        if m.get("val_accuracy") is not None
    }
    tracker.log_metrics(accuracies)
    tracker.log_dict(summary, "finetune.json")
    return {**summary, "train_seconds": train_seconds}


@flow(name="finetune", log_prints=True)
def finetune_flow(config: FinetuneConfig = FinetuneConfig()) -> dict:
    """Adapt the pretrained CLIPs to the reference task and train the baseline models."""
    with tracked_stage("finetune", config) as tracker:
        if D.wants_torchrun(config):
            result = launch_torchrun(config, tracker)
        else:
            result = run_finetune(config, tracker=tracker)
        seconds = result.get("train_seconds") or {}
        publish_metrics(tracker, METRICS, {"train_seconds": seconds})
        rows = [
            {"model": mid, **info, "train_seconds": seconds.get(mid)}
            for mid, info in result.get("models", {}).items()
        ]
        report_table("finetune-models", rows, "Models written by finetune")
        return result
