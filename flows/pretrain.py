"""Pretrain flow: OpenCLIP contrastive training on one pool (DVC runs one per pool).

With ``nproc_per_node > 1`` the flow launches the trainer under ``torchrun`` (DDP: gloo on
CPU, nccl on GPU) and logs the rank-0 history to MLflow when it ends; multi-node runs are
started by the launcher of each node (see infra/k8s/torchrun-job.yaml).

The run's timings (training and wall time, throughput) are not in ``models/pretrain/<pool>``,
a DVC output: the flow writes them, with the run's results, to ``metrics/pretrain/<pool>.json``
(DVC metrics, not cached) and logs them to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift.checkpoints import config_path
from clipshift.config import PretrainConfig
from clipshift.io_utils import write_json_atomic
from clipshift.stages.pretrain import TIMING_KEYS, run_path, run_pretrain
from flows._common import report_table, tracked_stage

METRICS = "metrics/pretrain/{pool}.json"


def launch_torchrun(config: PretrainConfig, pool: str, tracker) -> dict:
    """Train under torchrun, then log rank 0's history to this flow's MLflow run."""
    out = run_path(config, pool)
    before = _stamp(out / "metrics.json")
    fd, timings_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        args = ["--pool", pool, "--no-progress", "--timings-json", timings_path]
        D.launch_torchrun("clipshift.stages.pretrain", config, args)
        text = Path(timings_path).read_text()
        timings = json.loads(text).get(pool, {}) if text.strip() else {}
    finally:
        os.unlink(timings_path)
    result = {**json.loads((out / "metrics.json").read_text()), **timings}
    if before is not None and _stamp(out / "metrics.json") == before:
        # the ranks found a finished run with an identical training spec and left it as it was
        tracker.set_tags({"clipshift.reused": "true"})
        return {**result, "reused": True}
    rates = {r["step"]: r["samples_per_s"] for r in timings.get("throughput") or []}
    for record in json.loads((out / "history.json").read_text()):
        step = int(record.get("step", 0))
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        if step in rates:
            numbers["samples_per_s"] = float(rates[step])
        tracker.log_metrics(numbers, step=step)
    return result


def publish_run_metrics(tracker, pool: str, result: dict) -> dict:
    """``metrics/pretrain/<pool>.json``: the run's numbers and timings (not the per-step rates,
    which are MLflow metrics); the timings also go to the MLflow run."""
    metrics = {
        k: v
        for k, v in result.items()
        if k not in ("events", "throughput", "checkpoint") and isinstance(v, int | float | str)
    }
    metrics.update({k: result.get(k) for k in TIMING_KEYS if k != "throughput"})
    path = write_json_atomic(METRICS.format(pool=pool), metrics)
    numbers = {f"run_{k}": float(metrics[k]) for k in TIMING_KEYS if metrics.get(k) is not None}
    tracker.log_metrics(numbers)
    tracker.log_artifact(path, "metrics")
    return metrics


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
        publish_run_metrics(tracker, pool, result)
        report_table(
            f"pretrain-{pool}",
            [{k: v for k, v in result.items() if isinstance(v, int | float | str)}],
            f"Pretraining on pool '{pool}'",
        )
        return result
