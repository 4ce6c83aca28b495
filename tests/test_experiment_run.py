"""The pipeline deployment runs the study as a DVC experiment (clipshift.experiments).

Fast: the form's values become `dvc exp run -S` overrides that DVC applies to exactly those
values (checked with DVC's own hydra code), and a bad value is refused with the pydantic
message before anything starts. Slow: on the tiny profile, a committed `dvc repro` baseline,
then the pipeline flow with one changed value: only the affected stages re-run, `dvc exp show`
lists the experiment with that value, the checkout is untouched, and MLflow's parent run
carries the experiment's name; two experiments started together both land.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipshift import experiments
from clipshift.config import PipelineConfig
from clipshift.errors import ConfigError
from tests.study import exp_show, git, run, study_checkout
from tests.tiny import REPO_PARAMS, merged, tiny_params


def _repo_params() -> dict[str, Any]:
    return yaml.safe_load(REPO_PARAMS.read_text())


def _config(overrides: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate(merged(_repo_params(), overrides))


# --------------------------------------------------------------------------------------------
# form values -> -S


def test_unchanged_form_gives_no_override():
    assert experiments.set_param_overrides(_repo_params(), _config({})) == []


def test_one_changed_value_gives_one_override():
    overrides = experiments.set_param_overrides(_repo_params(), _config({"scaling": {"seed": 5}}))
    assert overrides == ["scaling.seed=5"]


def test_equal_values_spelled_differently_are_not_changes():
    raw = merged(_repo_params(), {"pretrain": {"lr": 0.001}})
    assert experiments.set_param_overrides(raw, _config({"pretrain": {"lr": 1e-3}})) == []


def test_a_key_the_file_omits_is_added_with_plus():
    raw = _repo_params()
    del raw["pretrain"]["spike_factor"]  # the model's default (3.0) applies
    overrides = experiments.set_param_overrides(raw, _config({"pretrain": {"spike_factor": 4.0}}))
    assert overrides == ["+pretrain.spike_factor=4.0"]


TRICKY = {
    "finetune": {
        "templates": ["it's a {}.", 'a "quoted" {}', "back\\slash {}", "a {}, [b]: c=d \\"],
        "soup_ingredients": [
            {"lr": 2e-4, "epochs": 1},
            {"lr": 3e-4, "epochs": 2, "label_smoothing": 0.1},
            {"lr": 1e-5, "epochs": 1},
        ],
    },
    "pretrain": {"lr": 2.5e-7, "gather_with_grad": True, "init_checkpoint": None},
    "scaling": {
        "grid": [{"width": 32, "layers": 1, "samples": 64 * i} for i in (2, 3, 4)],
        "baseline_metrics": None,
    },
}


def test_dvc_applies_the_overrides_to_exactly_the_form_values(tmp_path):
    """Quotes, backslashes, hydra's special characters, lists of mappings, floats in
    exponent form, nulls and booleans survive DVC's parser unchanged."""
    params = _config(TRICKY)
    overrides = experiments.set_param_overrides(_repo_params(), params)
    assert {o.split("=", 1)[0] for o in overrides} == {
        "finetune.templates",
        "finetune.soup_ingredients",
        "pretrain.lr",
        "pretrain.gather_with_grad",
        "scaling.grid",
        "scaling.baseline_metrics",
    }
    experiments.check_overrides(REPO_PARAMS, overrides, params)  # raises if anything differs
    # and for real, as `dvc exp run` does it, on a copy of the file
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copyfile(REPO_PARAMS, copy)
    apply_overrides(copy, overrides)
    applied = PipelineConfig.model_validate(yaml.safe_load(copy.read_text()))
    assert applied.finetune.templates == TRICKY["finetune"]["templates"]
    assert applied.model_dump() == params.model_dump()


def test_check_overrides_refuses_what_dvc_would_change(tmp_path):
    params = _config({"scaling": {"seed": 5}})
    with pytest.raises(ConfigError, match=r"scaling\.seed"):
        experiments.check_overrides(REPO_PARAMS, ["scaling.seed=6"], params)


def test_bad_form_value_names_the_key_and_the_rule():
    bad = merged(_repo_params(), {"pretrain": {"batch_size": -8}})
    with pytest.raises(ConfigError) as err:
        experiments.validated(bad)
    want = "'pretrain.batch_size' = -8: Input should be greater than or equal to 1"
    assert want in str(err.value)


def test_stage_lines_of_dvc_output():
    out = (
        "Reproducing experiment 'x'\n"
        "Stage 'fetch' didn't change, skipping\n"
        "Stage 'supervised@diverse' is cached - skipping run, checking out outputs\n"
        "Running stage 'scaling':\n> clipshift scaling\n"
        "Running stage 'report':\n> clipshift report\n"
    )
    assert experiments.stages_of(out) == (["scaling", "report"], ["fetch", "supervised@diverse"])


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("sqlite:///mlflow.db", "sqlite:////base/mlflow.db"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_relative_sqlite_store_is_made_absolute(uri, want):
    assert experiments.absolute_tracking_uri(uri, Path("/base")) == want


# --------------------------------------------------------------------------------------------
# refused before anything starts


@pytest.fixture
def small_repo(tmp_path, mlflow_store):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(REPO_PARAMS, repo / "params.yaml")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "params")
    return repo


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pretrain": {"batch_size": -8}}, "'pretrain.batch_size' = -8"),
        ({"finetune": {"pool": "nowhere"}}, "finetune.pool = 'nowhere' is not in pretrain.pools"),
    ],
)
def test_bad_value_starts_nothing(small_repo, mlflow_store, values, message):
    from mlflow import MlflowClient

    form = merged(_repo_params(), values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        experiments.run_experiment(form, "bad-run", repo=small_repo)
    assert experiments.existing_names(small_repo) == set()
    client = MlflowClient(tracking_uri=mlflow_store)
    exps = client.search_experiments()
    assert not exps or not client.search_runs([e.experiment_id for e in exps])


def test_bad_or_taken_name_starts_nothing(small_repo):
    with pytest.raises(ConfigError, match="experiment name"):
        experiments.run_experiment(_config({}), "no spaces/allowed", repo=small_repo)
    head = git(small_repo, "rev-parse", "HEAD").strip()
    git(small_repo, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/taken", head)
    with pytest.raises(ConfigError, match="named 'taken' exists"):
        experiments.run_experiment(_config({}), "taken", repo=small_repo)


# --------------------------------------------------------------------------------------------
# end to end on the tiny profile (slow)


@pytest.fixture(scope="module")
def tiny_repo(tiny_study, tmp_path_factory):
    """This module's own checkout of the session's tiny-study baseline."""
    return study_checkout(tiny_study[0], tmp_path_factory.mktemp("study") / "repo")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the session fixture may run the tiny study first
def test_form_run_is_a_dvc_experiment(tiny_repo, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow

    repo, env = tiny_repo
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("CLIPSHIFT_WORKERS", raising=False)
    lock_before = (repo / "dvc.lock").read_text()
    form = merged(tiny_params(), {"scaling": {"bootstrap": 25}})
    result = pipeline_flow(params=PipelineConfig.model_validate(form), experiment_name="boot25")

    assert result["set_params"] == ["scaling.bootstrap=25"]
    assert result["ran"] == ["scaling", "report"], result
    assert {"fetch", "validate", "pretrain", "finetune", "evaluate"} <= set(result["skipped"])
    listed = exp_show(repo, env)
    assert listed["boot25"]["params"]["scaling"]["bootstrap"] == 25
    assert "metrics/scaling.json" in listed["boot25"]["metrics"]
    # the checkout is untouched: its dvc.lock, its params and nothing to reproduce
    assert (repo / "dvc.lock").read_text() == lock_before
    assert yaml.safe_load((repo / "params.yaml").read_text())["scaling"]["bootstrap"] == 20
    assert "up to date" in run(["dvc", "status"], repo, env)

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.run_name == "pipeline-boot25"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.exp_name"] == "boot25"
    assert parent.data.params["scaling.bootstrap"] == "25"
    assert any(k.startswith("findings/findings.") for k in parent.data.metrics)
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert "plots/scaling" in plots and "plots/evaluate" in plots
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    stages = sorted(c.data.tags["clipshift.stage"] for c in children)
    assert stages == ["report", "scaling"]
    assert {c.data.tags["dvc.exp_name"] for c in children} == {"boot25"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_experiments_side_by_side(tiny_repo, monkeypatch):
    """Two runs at once, each in its own clone: both finish and both are listed."""
    repo, env = tiny_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    results: dict[str, Any] = {}

    def run(name: str, seeds: list[str]) -> None:
        form = merged(tiny_params(), {"report": {"other_seeds": seeds}})
        try:
            results[name] = experiments.run_experiment(form, name, repo=repo, echo=lambda _: None)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("side-a", [])),
        threading.Thread(target=run, args=("side-b", ["metrics/seeds/none.json"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    for name in ("side-a", "side-b"):
        assert isinstance(results[name], experiments.ExperimentRun), results[name]
        assert results[name].ran == ["report"]
    listed = exp_show(repo, env)
    assert listed["side-a"]["params"]["report"]["other_seeds"] == []
    assert listed["side-b"]["params"]["report"]["other_seeds"] == ["metrics/seeds/none.json"]
