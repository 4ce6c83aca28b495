"""Fetch flow: build the built-in emoji world and normalise external sources into shards."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from clipshift import tracking
from clipshift.config import FetchConfig
from clipshift.stages.fetch import fetch_metrics, run_fetch
from flows._common import publish_metrics, report_table, tracked_stage

METRICS = "metrics/fetch.json"


@task(name="fetch-datasets", retries=2, retry_delay_seconds=10)
def fetch_datasets(config: FetchConfig, tracker: tracking.MlflowTracker) -> dict:
    # Writes are atomic per dataset, so a retry after an I/O failure starts clean.
    return run_fetch(config, tracker)


@flow(name="fetch", log_prints=True)
def fetch_flow(config: FetchConfig = FetchConfig()) -> dict:
    """Build the emoji world and fetch every configured source into `data/fetch`."""
    with tracked_stage("fetch", config) as tracker:
        manifest = fetch_datasets(config, tracker)
        metrics = fetch_metrics(manifest)
        publish_metrics(tracker, METRICS, metrics)
        out = Path(config.out_dir)
        tracker.log_artifact(out / "manifest.json", "fetch")
        if (out / "card").exists():
            tracker.log_artifact(out / "card", "fetch/card")
        tracking.log_datasets(tracker, manifest, out)
        report_table(
            "fetch-datasets",
            [
                {"dataset": name, "role": info["role"], "samples": info["num_samples"]}
                for name, info in sorted(manifest["datasets"].items())
            ],
            "Datasets written by fetch",
        )
        print(f"fetch: {len(manifest['datasets'])} datasets in {out}")
        return metrics
