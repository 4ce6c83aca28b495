"""Scaling flow: one Prefect task per (pool, grid point), then the power-law fits.

Each grid point is a task, so the Prefect UI shows every training with its own state and
retries it alone; a retry (or a re-run of the flow) reuses finished runs and resumes a cut-off
one from its checkpoint. The runs go through a one-worker task runner on purpose: on a CPU
two trainings in parallel only share the same cores, and the trainer sets torch's process-wide
thread count.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from clipshift import tracking
from clipshift.config import PretrainConfig, ScalingConfig, ScalingRun
from clipshift.scaling_study import (
    EvalData,
    grid_points,
    load_eval_data,
    shared_pools,
    summarize,
    train_and_evaluate,
    world_image_size,
)
from flows._common import publish_metrics, report_table, tracked_stage


@task(name="scaling-run", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      task_run_name="scaling-{pool}-{point.width}x{point.layers}-{point.samples}")  # fmt: skip
def scaling_run(
    config: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    data: EvalData,
    image_size: int,
    tracker: tracking.MlflowTracker,
) -> dict:
    return train_and_evaluate(
        config, pretrain, pool, point, data, tracker, progress=False, image_size=image_size
    )


@flow(name="scaling", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def scaling_flow(
    config: ScalingConfig = ScalingConfig(), pretrain: PretrainConfig = PretrainConfig()
) -> dict:
    """Pretrain the model-size × samples grid on every pool, evaluate, fit E = A·C^alpha."""
    with tracked_stage("scaling", config) as tracker:
        # every run inherits the pretrain section's loop settings: record them too
        tracker.log_params(tracking.flatten({"pretrain": pretrain.model_dump(mode="json")}))
        data = load_eval_data(config)
        size = world_image_size(config.data_dir, config.pools)
        with shared_pools():  # each pool is decoded once for the whole grid
            futures = [
                scaling_run.submit(config, pretrain, pool, point, data, size, tracker)
                for pool, point in grid_points(config)
            ]
            rows = [f.result() for f in futures]
        summary = summarize(config, rows, tracker, write_metrics=False)
        publish_metrics(tracker, config.metrics_path, summary["metrics"])
        report_table("scaling-runs", [_run_line(r) for r in rows], "Scaling runs (accuracies)")
        report_table(
            "scaling-alpha",
            summary["comparison"],
            "Fitted exponent alpha of error vs training FLOPs, per task and pool (95% CI)",
        )
        for line in summary["comparison"]:
            print(line)
        return {**summary.pop("metrics"), **summary}


def _run_line(row: dict) -> dict:
    keep = ("width", "layers", "samples", "params", "flops", "zeroshot_accuracy",
            "retrieval_recall_5", "linear_probe_accuracy", "reused")  # fmt: skip
    return {"run": f"{row['pool']}/{row['run']}", **{k: row.get(k) for k in keep}}
