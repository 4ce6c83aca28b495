"""`dvc repro` in a temporary copy of the repository, on tiny params (slow: minutes). The
whole-study run is the session's tiny study (conftest.tiny_study), shared with the tests that
start from its baseline."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from clipshift.config import PipelineConfig
from tests.conftest import REPO
from tests.study import copy_with_tiny_params
from tests.test_logged_models import assert_every_checkpoint_is_a_model
from tests.tiny import tiny_params

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> tuple[Path, dict]:
    """The tracked files of the repository, committed in a fresh git repo, with tiny params."""
    dest = tmp_path_factory.mktemp("repo")
    copy_with_tiny_params(dest)
    # share the art cache so the copy does not reinstall npm packages
    if (REPO / ".cache").exists() and not (dest / ".cache").exists():
        (dest / ".cache").symlink_to(REPO / ".cache")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
    env.pop("CLIPSHIFT_PIPELINE_RUN_ID", None)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        _run(cmd, dest, env)
    return dest, env


def test_stage_list_shows_every_stage(repo_copy):
    dest, env = repo_copy
    out = _run(["dvc", "stage", "list", "--name-only"], dest, env).stdout.split()
    assert out == [
        "fetch",
        "validate",
        "pretrain",
        "supervised@diverse",
        "finetune",
        "interpolate",
        "evaluate",
        "scaling",
        "report",
    ]


def test_fetch_validate_then_noop_in_under_5s(repo_copy):
    dest, env = repo_copy
    _run(["dvc", "repro", "fetch", "validate"], dest, env)
    assert (dest / "data/fetch/manifest.json").exists()
    assert (dest / "data/validate/data_docs").exists()
    start = time.perf_counter()
    again = _run(["dvc", "repro", "fetch", "validate"], dest, env)
    elapsed = time.perf_counter() - start
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    assert elapsed < 5.0, f"no-op dvc repro took {elapsed:.1f}s"
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], dest, env).stdout)
    assert 5 in _values_of(shown, "num_classes")


def _values_of(obj, key: str) -> list:
    """Every value stored under ``key`` anywhere in a nested JSON document."""
    if isinstance(obj, dict):
        found = [obj[key]] if key in obj else []
        return found + [v for child in obj.values() for v in _values_of(child, key)]
    if isinstance(obj, list):
        return [v for child in obj for v in _values_of(child, key)]
    return []


def assert_study_report(dest: Path, uri: str, findings: dict) -> None:
    """reports/study.html: every finding, the figures embedded, and the same page on the
    pipeline's MLflow run."""
    import mlflow

    from clipshift.tracking import EXPERIMENT

    html = (dest / "reports/study.html").read_text()
    assert all(f"<code>{fid}</code>" in html for fid in findings)
    assert html.count('<img src="data:image/png;base64,') >= 5  # scatter, scaling, card
    client = mlflow.MlflowClient(tracking_uri=uri)
    (report_run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        "tags.`clipshift.stage` = 'report'",
    )
    parent = report_run.data.tags["mlflow.parentRunId"]
    assert parent in html and report_run.info.run_id in html
    assert [a.path for a in client.list_artifacts(parent, "reports")] == ["reports/study.html"]


@pytest.mark.timeout(2400)  # the session fixture may run the tiny study first
def test_whole_study_end_to_end(tiny_study):
    """The session's tiny study: a whole `dvc repro` of a fresh copy with the study's own
    defaults (stages side by side in workers), run once for every test that needs it."""
    dest, env = tiny_study
    pools = PipelineConfig.model_validate(tiny_params()).pretrain.pools
    for pool in pools:  # trained in workers, published by the flow
        assert json.loads((dest / f"metrics/pretrain/{pool}.json").read_text())["pool"] == pool
    evaluate = json.loads((dest / "metrics/evaluate.json").read_text())
    kinds = {m["kind"] for m in evaluate["models"].values()}
    assert {"baseline", "zeroshot", "finetuned", "linear", "wiseft", "soup", "supervised"} <= kinds
    for model in evaluate["models"].values():
        assert 0.0 <= model["id_accuracy"] <= 1.0
        assert set(model["effective_robustness"]) == set(evaluate["baseline_fit"]) - {"avg"}
    findings = json.loads((dest / "metrics/findings.json").read_text())["findings"]
    assert "baselines_on_line" in findings and "criterion" in findings["baselines_on_line"]
    assert_study_report(dest, env["MLFLOW_TRACKING_URI"], findings)
    scaling = json.loads((dest / "metrics/scaling.json").read_text())
    # frontier fits need two frontier runs, which a tiny world need not give; all-runs fits do
    assert scaling["fits_all_runs"] and len(scaling["runs"]) >= 3 and scaling["pool_size"]
    # every checkpoint an MLflow LoggedModel, with dataset-linked metrics and its parents
    assert assert_every_checkpoint_is_a_model(dest, env["MLFLOW_TRACKING_URI"]) >= 20
    status = _run(["dvc", "status"], dest, env).stdout
    assert "up to date" in status or "changed" not in status
