"""Supervised flow: Fang et al.'s control (a) on one pool (DVC runs one per pool).

The run's timings (training and wall time, throughput) are not in ``models/supervised/<pool>``,
a DVC output: the flow writes them, with the run's results, to ``metrics/supervised/<pool>.json``
(DVC metrics, not cached) and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import logged_models, tracking
from clipshift.config import PretrainConfig, SupervisedConfig
from clipshift.io_utils import write_json_atomic
from clipshift.stages.supervised import TIMING_KEYS, model_id, run_path, run_supervised
from flows._common import report_table, tracked_stage

METRICS = "metrics/supervised/{pool}.json"


@flow(name="supervised", log_prints=True)
def supervised_flow(
    config: SupervisedConfig = SupervisedConfig(),
    pretrain: PretrainConfig = PretrainConfig(),
    pool: str = "diverse",
) -> dict:
    """Train CLIP's image tower with cross-entropy on `pool`'s emoji, at CLIP's image compute
    (pretrain's samples, batches, optimiser and schedule), and save it as a task classifier."""
    with tracked_stage("supervised", config, run_name=model_id(pool)) as tracker:
        tracker.log_params(tracking.flatten({"pretrain": pretrain.model_dump(mode="json")}))
        result = run_supervised(config, pretrain, pool, tracker)
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
        path = write_json_atomic(METRICS.format(pool=pool), scalars)
        numbers = {f"run_{k}": float(result[k]) for k in TIMING_KEYS if result.get(k) is not None}
        tracker.log_metrics(numbers)
        tracker.log_artifact(path, "metrics")
        models = Path(config.out_dir).parent
        logged_models.log_index(tracker, run_path(config, pool), models, models / "pretrain")
        report_table(model_id(pool), [scalars], f"Supervised control on pool '{pool}'")
        return result
