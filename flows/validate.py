"""Validate flow: Great Expectations suites and leakage checks over fetch's output."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from clipshift.config import ValidateConfig
from clipshift.errors import ValidationFailed
from clipshift.stages.validate import run_validate
from flows._common import publish_metrics, report_markdown, tracked_stage

METRICS = "metrics/validate.json"


@flow(name="validate", log_prints=True)
def validate_flow(config: ValidateConfig = ValidateConfig()) -> dict:
    """Check every dataset; a failing expectation stops the pipeline with a clear message."""
    with tracked_stage("validate", config) as tracker:
        out = Path(config.out_dir)
        try:
            report = run_validate(config)
        finally:
            # The report and Data Docs exist whether the suites passed or not.
            for name in ("report.json", "data_docs"):
                if (out / name).exists():
                    tracker.log_artifact(out / name, f"validate/{name}")
        metrics = report.metrics() if hasattr(report, "metrics") else {}
        if (out / "metrics.json").exists():
            import json

            metrics = json.loads((out / "metrics.json").read_text())
        # the timing goes to metrics/ and MLflow only: data/validate is a DVC output
        metrics["validate_seconds"] = round(report.seconds, 2)
        publish_metrics(tracker, METRICS, metrics)
        report_markdown("validate-summary", report.summary_markdown(), "Data validation summary")
        return metrics


__all__ = ["validate_flow", "ValidationFailed"]
