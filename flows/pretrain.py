"""Pretrain flow: OpenCLIP contrastive training, one model per pool.

On a CPU the pools train side by side, one worker process and core each
(:mod:`clipshift.parallel`: 1.6x the throughput of one after the other on all cores); each
pool keeps its own MLflow run, which gets what its worker logged when the pools end.

With ``distributed`` asking for several ranks the trainer runs under torchrun (DDP: gloo on
CPU, nccl on GPU; :func:`clipshift.distributed.run_stage`) and rank 0's history reaches MLflow
when it ends; with several nodes every node runs the same launch (infra/k8s/torchrun-job.yaml).

The run's timings (training and wall time, throughput) are not in ``models/pretrain/<pool>``,
a DVC output: the flow writes them, with the run's results, to ``metrics/pretrain/<pool>.json``
(DVC metrics, not cached) and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift import logged_models
from clipshift.config import PretrainConfig
from clipshift.io_utils import write_json_atomic
from clipshift.parallel import Run, run_side_by_side, worker_count
from clipshift.stages.pretrain import TIMING_KEYS, run_path, run_pretrain
from clipshift.tracking_api import RecordingTracker, replay
from flows._common import report_table, tracked_stage

METRICS = "metrics/pretrain/{pool}.json"


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


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    config: PretrainConfig = PretrainConfig(), pool: str | None = None
) -> dict[str, dict]:
    """Train one CLIP per pool (`pool`, or every pool in `config.pools`), each resuming from
    its newest valid checkpoint. On a CPU the pools train side by side, one core each."""
    pools = [pool] if pool else list(config.pools)
    workers = (
        1 if D.wants_torchrun(config) else worker_count(len(pools), D.resolve_device(config.device))
    )
    if workers == 1:
        return {p: train_pool(config, p) for p in pools}
    recorders = {p: RecordingTracker() for p in pools}
    runs = [Run(run_pretrain, {"cfg": config, "pool": p}, recorders[p]) for p in pools]
    results = run_side_by_side(runs, workers)
    return {
        p: record_pool(config, p, result, recorders[p])
        for p, result in zip(pools, results, strict=True)
    }


def train_pool(config: PretrainConfig, pool: str) -> dict:
    """One pool in this process (or on torchrun ranks), logging to MLflow as it trains."""
    with tracked_stage("pretrain", config, run_name=f"pretrain-{pool}") as tracker:
        tracker.set_tags({"clipshift.pool": pool})
        result = D.run_stage(run_pretrain, config, tracker, pool=pool)
        publish_pool(tracker, config, pool, result)
        return result


def record_pool(
    config: PretrainConfig, pool: str, result: dict, recorded: RecordingTracker
) -> dict:
    """A pool trained in a worker process: its MLflow run gets what the run logged there."""
    with tracked_stage("pretrain", config, run_name=f"pretrain-{pool}") as tracker:
        tracker.set_tags({"clipshift.pool": pool})
        replay(recorded.dump(), tracker)
        publish_pool(tracker, config, pool, result)
        return result


def starting_weights(result: dict) -> dict:
    """The run's starting point (published tag or hub id, its file sha256, or the
    init_checkpoint), as the LoggedModel's lineage params."""
    return {k: v for k, v in result.items() if k.startswith(("pretrained", "init_checkpoint"))}


def publish_pool(tracker, config: PretrainConfig, pool: str, result: dict) -> None:
    checkpoint = Path(result.get("checkpoint", run_path(config, pool) / "checkpoint.pt"))
    if checkpoint.exists():
        facts = {"pool": pool, "seed": config.seed, "lr": config.lr,
                 "batch_size": config.batch_size, "samples": result.get("samples"),
                 "steps": result.get("steps"), "data": f"pool {pool}"}  # fmt: skip
        facts.update(starting_weights(result))
        if not result.get("samples"):  # samples: 0: published weights recorded as they are
            facts["data"] = "none (the starting weights, not trained here)"
        model = logged_models.clip_model(f"pretrain-{pool}", checkpoint, result["model"], facts)
        logged_models.ModelLogger(tracker).log([model])
    publish_run_metrics(tracker, pool, result)
    report_table(
        f"pretrain-{pool}",
        [{k: v for k, v in result.items() if isinstance(v, int | float | str)}],
        f"Pretraining on pool '{pool}'",
    )
