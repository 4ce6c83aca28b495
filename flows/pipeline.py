"""The whole study as one Prefect flow that runs it as a DVC experiment.

The `pipeline` deployment's form holds every section of params.yaml (deployed with its
values). Submitting it runs ``dvc exp run -S key=value ...`` for the values that differ from
params.yaml at the checkout's last commit, in a temporary clone (clipshift.experiments): DVC
skips the stages whose inputs did not change, the run is an experiment named after the flow
run that ``dvc exp show`` lists, and the checkout's own outputs and dvc.lock stay as they were.
Its MLflow parent run (named ``pipeline-<experiment>``) holds a child run per stage that ran,
every setting, the experiment's metrics and its plots; this flow run links to it.

For one stage on ad-hoc settings, outside DVC, use that stage's own deployment.
"""

from __future__ import annotations

import re
import time

from prefect import flow
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from clipshift import experiments, tracking
from clipshift.config import PipelineConfig, load_params
from flows._common import report_markdown, report_table

# The findings table is the study's summary; the full metrics are in DVC and MLflow.
FINDINGS_PREFIX = "findings/findings."


def default_name() -> str:
    """The flow run's name (e.g. 'cheerful-otter'), so the Prefect run and the DVC
    experiment are found by the same words; a UTC time stamp outside Prefect."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(flow_run.name or "")).strip("-_")
    return name or time.strftime("exp-%Y%m%d-%H%M%S", time.gmtime())


def _link_mlflow(run_id: str) -> None:
    create_link_artifact(
        key="mlflow-pipeline",
        link=tracking.run_url(run_id),
        link_text="MLflow run of this pipeline",
        description=f"MLflow parent run {run_id}: every setting, the experiment's metrics and "
        "plots, and a child run per stage that ran",
    )


def _summary(result: experiments.ExperimentRun) -> str:
    settings = "\n".join(f"- `{o}`" for o in result.overrides) or "- none (params.yaml as is)"
    findings = {
        k.removeprefix(FINDINGS_PREFIX): v
        for k, v in result.metrics.items()
        if k.startswith(FINDINGS_PREFIX) and k.endswith(".value")
    }
    rows = "\n".join(f"| `{k.removesuffix('.value')}` | {v:.3f} |" for k, v in findings.items())
    table = f"| finding | value |\n|---|---|\n{rows}" if rows else "(no findings file)"
    url = tracking.run_url(result.mlflow_run_id)
    return (
        f"# DVC experiment `{result.name}`\n\n"
        f"Baseline commit `{result.baseline_rev[:7]}`, experiment commit `{result.rev[:7]}`.\n\n"
        f"Settings changed from params.yaml (`dvc exp run -S`):\n{settings}\n\n"
        f"Stages run: {', '.join(result.ran) or 'none'}; skipped (unchanged): "
        f"{', '.join(result.skipped) or 'none'}.\n\n{table}\n\n"
        f"MLflow: [parent run {result.mlflow_run_id}]({url}).\n\n"
        f"In the checkout: `dvc exp show`, `dvc exp apply {result.name}`."
    )


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: PipelineConfig | None = None, experiment_name: str | None = None) -> dict:
    """The study as a DVC experiment: fetch → validate → pretrain → supervised → finetune →
    interpolate → evaluate → scaling → report, each stage re-run only if its inputs changed.

    Without `params`, the run uses params.yaml in its working directory (deployments fill
    them in from params.yaml when deployed). `experiment_name` defaults to the flow run's."""
    params = params if params is not None else load_params("params.yaml")
    name = experiment_name or default_name()
    result = experiments.run_experiment(
        params,
        name,
        repo=".",
        echo=print,
        tags={"prefect.flow_run_id": str(flow_run.id or "")},
        on_parent=_link_mlflow,
    )
    report_table(
        "dvc-stages",
        [{"stage": s, "status": "ran"} for s in result.ran]
        + [{"stage": s, "status": "skipped (unchanged)"} for s in result.skipped],
        f"Stages of DVC experiment {result.name}",
    )
    report_markdown("dvc-experiment", _summary(result), f"DVC experiment {result.name}")
    return {
        "experiment": result.name,
        "rev": result.rev,
        "baseline_rev": result.baseline_rev,
        "set_params": result.overrides,
        "ran": result.ran,
        "skipped": result.skipped,
        "mlflow_run_id": result.mlflow_run_id,
    }
