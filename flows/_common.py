"""What every stage flow does around the library call: an MLflow child run with lineage tags,
the flow-run id on the MLflow run, and the MLflow run URL as a Prefect link artifact."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from clipshift import tracking
from clipshift.io_utils import write_json_atomic


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


@contextlib.contextmanager
def tracked_stage(
    stage: str, config: BaseModel, run_name: str | None = None
) -> Iterator[tracking.MlflowTracker]:
    tags = {"prefect.flow_run_id": str(flow_run.id or "")}
    params = config.model_dump(mode="json")
    with tracking.stage_run(stage, params=params, run_name=run_name, extra_tags=tags) as tracker:
        create_link_artifact(
            key=artifact_key(f"mlflow-{run_name or stage}"),
            link=tracking.run_url(tracker.run_id),
            link_text=f"MLflow run of {run_name or stage}",
            description=f"MLflow run {tracker.run_id} (metrics, checkpoints, plots, lineage)",
        )
        yield tracker


def publish_metrics(tracker: tracking.MlflowTracker, path: str | Path, metrics: dict) -> None:
    """Write a DVC metrics file and log its numbers to MLflow."""
    write_json_atomic(path, metrics)
    flat = {k: v for k, v in tracking.flatten(metrics).items() if isinstance(v, int | float)}
    tracker.log_metrics({k.replace("/", "_"): float(v) for k, v in flat.items()})
    tracker.log_artifact(path, "metrics")


def report_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=artifact_key(key), table=rows, description=description)


def report_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
