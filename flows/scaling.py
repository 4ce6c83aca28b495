"""Scaling flow: one Prefect task per (pool, grid point), then the power-law fits.

Each grid point is a task, so the Prefect UI shows every training with its own state and
retries it alone; a retry (or a re-run of the flow) reuses finished runs and resumes a cut-off
one from its checkpoint. The flow calls :func:`clipshift.stages.scaling.run_scaling` with the
task as its ``run_point``. On a CPU the grid's trainings run first, side by side in worker
processes with a core each (:func:`~clipshift.stages.scaling.train_side_by_side`); each task
then evaluates its point and gets the training's log in its MLflow run.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from clipshift import logged_models, tracking
from clipshift.config import FinetuneConfig, PretrainConfig, ScalingConfig, ScalingRun
from clipshift.stages import scaling as S
from clipshift.stages.scaling import GridInputs, Trained, run_scaling, train_and_evaluate
from flows._common import publish_metrics, report_table, tracked_stage


@task(name="scaling-run", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      task_run_name="scaling-{pool}-{point.width}x{point.layers}-{point.samples}"
                    "-f{fraction}")  # fmt: skip
def scaling_run(
    config: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    inputs: GridInputs,
    tracker: tracking.MlflowTracker,
    progress: bool,
    fraction: float = 1.0,
    trained: Trained | None = None,
) -> dict:
    row = train_and_evaluate(
        config, pretrain, pool, point, inputs, tracker, progress, fraction, trained
    )
    log_point_model(tracker, config, pool, point, fraction, inputs, row)
    return row


def log_point_model(
    tracker: tracking.MlflowTracker,
    config: ScalingConfig,
    pool: str,
    point: ScalingRun,
    fraction: float,
    inputs: GridInputs,
    row: dict,
) -> None:
    """The point's CLIP as a LoggedModel (a reused pretrain run already is one), with its
    scores linked to it and to their datasets."""
    logger = logged_models.ModelLogger(tracker)
    checkpoint = S.point_checkpoint(config, pool, point, fraction, row)
    if not row.get("reused"):
        architecture = f"{inputs.family[0]}-w{point.width}-l{point.layers}"
        facts = {
            "pool": pool,
            "width": point.width,
            "layers": point.layers,
            "samples": row.get("samples"),
            "fraction": fraction,
            "data": f"pool {pool}",
        }
        name = f"scaling-{pool}-{S.run_name(point, fraction)}"
        logger.log([logged_models.clip_model(name, checkpoint, architecture, facts)])
    values = logged_models.scaling_metrics(row, S.ID_DATASET, S.RETRIEVAL_DATASET)
    logger.log_metrics(checkpoint, values, logged_models.dataset_digests(config.data_dir))


@flow(name="scaling", log_prints=True)
def scaling_flow(
    config: ScalingConfig = ScalingConfig(),
    pretrain: PretrainConfig = PretrainConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
) -> dict:
    """Pretrain the model-size × samples grid on every pool (the pretrain run reused), evaluate
    under shift, run the pool-size ablation, fit E = A·C^exponent on the compute frontier.

    Every run takes the pretrain section's loop settings and is scored with the finetune
    section's prompt templates and linear-probe settings."""
    with tracked_stage("scaling", config) as tracker:
        sections = {"pretrain": pretrain, "finetune": finetune}
        tracker.log_params(
            tracking.flatten({k: v.model_dump(mode="json") for k, v in sections.items()})
        )
        summary = run_scaling(
            config, pretrain, finetune, tracker, False, write_metrics=False, run_point=scaling_run
        )
        keys = ("fits", "fits_all_runs", "runs", "pool_size", "findings")
        metrics = {k: summary[k] for k in keys}
        publish_metrics(tracker, config.metrics_path, metrics)
        report_table(
            "scaling-runs", [_run_line(r) for r in summary["runs"]], "Scaling runs (accuracies)"
        )
        report_table(
            "scaling-exponent",
            summary["comparison"],
            "Exponent of error vs training FLOPs on the compute-Pareto frontier (95% CI)",
        )
        for line in summary["comparison"]:
            print(line)
        return summary


def _run_line(row: dict) -> dict:
    keep = ("width", "layers", "samples", "params_non_embedding", "flops", "zeroshot_accuracy",
            "effective_robustness_avg", "retrieval_recall_5", "linear_probe_accuracy",
            "on_frontier", "reused")  # fmt: skip
    return {"run": f"{row['pool']}/{row['run']}", **{k: row.get(k) for k in keep}}
