"""Interpolate flow: WiSE-FT α sweeps and model soups, α chosen on the reference val split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift import logged_models
from clipshift.config import InterpolateConfig
from clipshift.stages.interpolate import run_interpolate
from flows._common import publish_metrics, tracked_stage

METRICS = "metrics/interpolate.json"


@flow(name="interpolate", log_prints=True)
def interpolate_flow(config: InterpolateConfig = InterpolateConfig()) -> dict:
    """Sweep α between zero-shot and fine-tuned weights; build uniform and greedy soups."""
    with tracked_stage("interpolate", config) as tracker:
        result = run_interpolate(config, tracker=tracker)
        publish_metrics(tracker, METRICS, result)
        models = Path(config.finetune_dir).parent
        logged_models.log_index(tracker, config.out_dir, models, models / "pretrain")
        return result
