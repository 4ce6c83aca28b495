"""Evaluate flow: accuracy on the test set and every shift, retrieval, effective robustness.

With ``distributed`` asking for several ranks the stage runs under torchrun
(:func:`clipshift.distributed.run_stage`): each rank scores its shard of every dataset, rank 0
writes the metrics, and what it logged reaches MLflow when it ends.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import distributed as D
from clipshift import logged_models, tracking
from clipshift.config import EvaluateConfig
from clipshift.registry import read_indices
from clipshift.stages.evaluate import run_evaluate
from flows._common import report_table, tracked_stage


def register_champion(
    tracker: tracking.MlflowTracker, summary: dict, config: EvaluateConfig
) -> None:
    """Register the WiSE-FT model chosen on val as `<registered_model>@champion`."""
    chosen = summary.get("selected", {}).get("wiseft_end-to-end")
    if not config.register_model or chosen is None:
        return
    entry = next(e for e in read_indices(config.models_dir) if e.id == chosen)
    record = summary["models"][chosen]
    tags = {
        "model_id": chosen,
        "wise_alpha": str(entry.wise_alpha),
        "id_accuracy": str(record["id_accuracy"]),
    }
    logged = logged_models.ModelLogger(tracker).model_id(entry.path)
    if logged is not None:  # the LoggedModel interpolate made of the chosen point
        version = logged_models.promote(logged, config.registered_model, tags=tags)
    else:  # interpolate logged elsewhere (another MLflow store): log it here
        version = tracking.register_classifier(
            tracker, entry.path, config.registered_model, tags=tags
        )
    print(f"registered {chosen} as {config.registered_model} v{version} @champion")


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: EvaluateConfig = EvaluateConfig()) -> dict:
    """Evaluate every model and fit the effective-robustness baseline per shift."""
    with tracked_stage("evaluate", config) as tracker:
        summary = D.run_stage(run_evaluate, config, tracker)
        linked = logged_models.link_evaluation(tracker, summary, config.models_dir, config.data_dir)
        print(f"{linked} metrics linked to their models and datasets")
        register_champion(tracker, summary, config)
        tracker.log_artifact(config.metrics_path, "metrics")
        if Path(config.plots_dir).exists():
            tracker.log_artifact(config.plots_dir, "plots")
        report_table(
            "evaluate-models",
            [
                {
                    "model": mid,
                    "kind": m["kind"],
                    "id_accuracy": round(m["id_accuracy"], 4),
                    "ood_accuracy_avg": round(m["ood_accuracy_avg"], 4),
                    "effective_robustness_avg": round(m["effective_robustness_avg"], 4),
                }
                for mid, m in sorted(summary["models"].items())
            ],
            "ID / OOD accuracy and effective robustness per model",
        )
        return summary
