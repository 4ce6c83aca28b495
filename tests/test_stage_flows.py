"""fetch and validate as Prefect flows against a real (SQLite) MLflow store, on a tiny world."""

from __future__ import annotations

import json

import mlflow
import pytest

from clipshift import tracking
from clipshift.config import FetchConfig, ValidateConfig
from clipshift.errors import ValidationFailed
from tests.tiny import ART_CACHE, TINY_WORLD, copy_sample_into


@pytest.fixture
def fetched(mlflow_store, prefect_harness, tmp_path):
    from flows.fetch import fetch_flow

    config = FetchConfig(
        world=TINY_WORLD, out_dir=str(tmp_path / "data/fetch"), cache_dir=str(ART_CACHE)
    )
    metrics = fetch_flow(config=config)
    return config, metrics


def test_fetch_flow_writes_world_metrics_and_mlflow_lineage(fetched, mlflow_store, tmp_path):
    config, metrics = fetched
    assert metrics["num_classes"] == TINY_WORLD["num_classes"]
    assert metrics["samples"]["pool-diverse"] == metrics["samples"]["pool-narrow"] == 80
    assert json.loads((tmp_path / "metrics/fetch.json").read_text()) == metrics
    mlflow.set_tracking_uri(mlflow_store)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.`clipshift.stage` = 'fetch'")
    assert run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["prefect.flow_run_id"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"train", "test", "pool-diverse"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "fetch")}
    assert "fetch/manifest.json" in artifacts and "fetch/card" in artifacts


def test_validate_flow_passes_clean_world_then_fails_on_planted_leak(fetched, tmp_path):
    from flows.validate import validate_flow

    config, _ = fetched
    vconfig = ValidateConfig(
        data_dir=config.out_dir, out_dir=str(tmp_path / "data/validate"), leakage="fail"
    )
    metrics = validate_flow(config=vconfig)
    assert (tmp_path / "data/validate/data_docs").exists()
    assert json.loads((tmp_path / "metrics/validate.json").read_text()) == metrics

    # plant a test image into a pretraining pool: leakage=fail must stop with a clear message
    copy_sample_into(config.out_dir, "test", "pool-diverse")
    with pytest.raises(ValidationFailed) as err:
        validate_flow(config=vconfig)
    assert "pool-diverse" in str(err.value) and "report" in str(err.value)
