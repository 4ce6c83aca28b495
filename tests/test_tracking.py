"""MLflow plumbing against a real (SQLite) store: nesting, lineage tags, redaction, buffering."""

from __future__ import annotations

import mlflow
import pytest

from clipshift import tracking


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client, client.search_runs([exp.experiment_id])


def test_stage_runs_nest_under_one_pipeline_run(mlflow_store, tmp_path):
    (tmp_path / "params.yaml").write_text("fetch: {}\n")
    with tracking.stage_run("fetch", params={"a": {"b": 1}}) as t1:
        t1.log_metrics({"x": 1.0}, step=0)
    with tracking.stage_run("validate") as t2:
        pass
    client, runs = _runs(mlflow_store)
    parents = [r for r in runs if r.data.tags.get("clipshift.kind") == "pipeline"]
    assert len(parents) == 1
    children = {r.info.run_id: r for r in runs if r not in parents}
    assert set(children) == {t1.run_id, t2.run_id}
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["git.commit"]
        assert run.info.status == "FINISHED"
    assert children[t1.run_id].data.params["a.b"] == "1"
    assert children[t1.run_id].data.metrics["x"] == 1.0


def test_changed_params_start_a_new_pipeline_run(mlflow_store, tmp_path):
    (tmp_path / "params.yaml").write_text("fetch: {seed: 0}\n")
    with tracking.stage_run("fetch"):
        pass
    (tmp_path / "params.yaml").write_text("fetch: {seed: 1}\n")
    with tracking.stage_run("fetch"):
        pass
    _, runs = _runs(mlflow_store)
    assert sum(r.data.tags.get("clipshift.kind") == "pipeline" for r in runs) == 2


def test_failed_stage_marks_its_run_failed(mlflow_store):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("fetch") as tracker:
            raise RuntimeError("boom")
    client, _ = _runs(mlflow_store)
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_secrets_from_environment_never_reach_params(mlflow_store, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    with tracking.stage_run("fetch", params={"uri": "s3://k:s3cr3t-value-xyz@bucket"}) as t:
        t.set_tags({"note": "key s3cr3t-value-xyz"})
    client, _ = _runs(mlflow_store)
    run = client.get_run(t.run_id)
    assert "s3cr3t" not in str(run.data.params) + str(run.data.tags)
    assert "***" in run.data.params["uri"]


def test_lineage_tags_read_dep_hashes_from_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  b:\n    cmd: x\n    deps: [data/a]\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  a:\n    cmd: y\n    outs:\n    - path: data/a\n"
        "      md5: abc123.dir\n"
    )
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    tags = tracking.lineage_tags("b")
    assert tags["dvc.dep.data/a"] == "abc123.dir"
    assert tags["dvc.exp_name"] == "exp-1"


def test_metrics_are_buffered_while_the_server_is_down(mlflow_store):
    with tracking.stage_run("pretrain") as tracker:
        real = tracker.client

        class Down:
            def log_batch(self, *a, **k):
                raise ConnectionError("server down")

        tracker.client = Down()
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_metrics({"loss": 0.5}, step=2)
        assert len(tracker._pending) == 2  # kept, not lost
        tracker.client = real
        tracker.log_metrics({"loss": 0.25}, step=3)
        assert tracker._pending == []
    client, _ = _runs(mlflow_store)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0, 0.5, 0.25]
