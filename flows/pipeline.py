"""The whole study as one Prefect flow: the same stages `dvc repro` runs, in the same order.

Use it from the Prefect UI (deployment `clipshift-pipeline`) when DVC is not driving; every
stage flow becomes a subflow and its MLflow run nests under one pipeline run.
"""

from __future__ import annotations

import os

from prefect import flow

from clipshift import tracking
from clipshift.config import PipelineConfig, load_params
from flows.evaluate import evaluate_flow
from flows.fetch import fetch_flow
from flows.finetune import finetune_flow
from flows.interpolate import interpolate_flow
from flows.pretrain import pretrain_flow
from flows.report import report_flow
from flows.scaling import scaling_flow
from flows.supervised import supervised_flow
from flows.validate import validate_flow


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: PipelineConfig | None = None, run_scaling: bool = True) -> dict:
    """fetch → validate → pretrain (every pool) → supervised (each pool) → finetune →
    interpolate → evaluate → scaling → report.

    Without `params`, the run reads params.yaml in its working directory (deployments fill
    them in from params.yaml when deployed)."""
    params = params if params is not None else load_params("params.yaml")
    parent = tracking.open_pipeline_run()
    os.environ["CLIPSHIFT_PIPELINE_RUN_ID"] = parent  # stage runs nest under this one
    try:
        fetch_flow(config=params.fetch)
        validate_flow(config=params.section("validate"))
        pretrain_flow(config=params.pretrain)  # every pool, side by side on a CPU
        for pool in params.supervised.pools:
            supervised_flow(config=params.supervised, pretrain=params.pretrain, pool=pool)
        finetune_flow(config=params.finetune)
        interpolate_flow(config=params.interpolate)
        summary = evaluate_flow(config=params.evaluate)
        scaling = (
            scaling_flow(config=params.scaling, pretrain=params.pretrain, finetune=params.finetune)
            if run_scaling
            else {}
        )
        report_flow(config=params.report)
    finally:
        os.environ.pop("CLIPSHIFT_PIPELINE_RUN_ID", None)
    return {"evaluate": summary.get("baseline_fit", {}), "scaling": scaling.get("fits", {})}
