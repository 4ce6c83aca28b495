"""The scaling stage on a tiny world: contract, reuse of finished runs, FLOPs, retraining."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clipshift.config import FinetuneConfig, PretrainConfig, ScalingConfig, ScalingRun
from clipshift.stages.scaling import (
    TASKS,
    grid_inputs,
    grid_points,
    load_eval_data,
    run_dir,
    run_scaling,
    train_and_evaluate,
)
from clipshift.tracking_api import RecordingTracker
from tests.test_loaders import CLASSES, build_labelled, build_pool

SIZE = 16
GRID = [(32, 1, 128), (32, 1, 256), (64, 1, 256)]


def build_tiny_world(root: Path) -> Path:
    """Two pools, train/test/retrieval and a manifest: the layout fetch writes."""
    data = root / "fetch"
    datasets = {
        "pool-diverse": build_pool(data, n=64, seed=0, size=SIZE, name="pool-diverse"),
        "pool-narrow": build_pool(data, n=64, seed=1, size=SIZE, name="pool-narrow"),
        "retrieval": build_pool(data, n=32, seed=2, size=SIZE, name="retrieval"),
        "train": build_labelled(data, n=32, name="train", size=SIZE, seed=3),
        "test": build_labelled(data, n=24, name="test", size=SIZE, seed=4),
    }
    manifest = {
        "task": {"classes": CLASSES},
        "datasets": {k: json.loads((p / "dataset.json").read_text()) for k, p in datasets.items()},
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


FINETUNE = FinetuneConfig()  # the evaluation protocol: default templates and linear probe


def configs(root: Path, **scaling) -> tuple[ScalingConfig, PretrainConfig]:
    cfg = ScalingConfig(
        data_dir=str(root / "fetch"),
        validate_dir=str(root / "validate"),
        out_dir=str(root / "models"),
        metrics_path=str(root / "metrics" / "scaling.json"),
        plots_dir=str(root / "plots"),
        grid=[ScalingRun(width=w, layers=d, samples=s) for w, d, s in GRID],
        batch_size=32,
        bootstrap=50,
        **scaling,
    )
    pretrain = PretrainConfig(warmup_steps=1, log_every=2, checkpoint_every=4, device="cpu")
    return cfg, pretrain


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from a second thread, and on a busy 2-core machine torch's
    spinning threads make every step many times slower: train them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # run_pretrain sets its thread count from it
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real run of the stage, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("scaling")
    build_tiny_world(root)
    # A leaked test sample the validate stage dropped: the evaluation must not see it.
    (root / "validate").mkdir()
    (root / "validate" / "exclude.json").write_text(json.dumps({"test": ["t0000", "t0001"]}))
    cfg, pretrain = configs(root)
    tracker = RecordingTracker()
    result = run_scaling(cfg, pretrain, FINETUNE, tracker=tracker, progress=False)
    return root, cfg, pretrain, result, tracker


def test_metrics_contract(study):
    root, cfg, _, result, _ = study
    metrics = json.loads(Path(cfg.metrics_path).read_text())
    assert set(metrics) == {"fits", "runs"}
    assert len(metrics["runs"]) == 6
    for pool in cfg.pools:
        for task in ("zeroshot", "retrieval"):  # a probe can reach 100 %: no error to fit
            for x in ("flops", "samples", "params"):
                fit = metrics["fits"][f"{task}/{pool}/vs_{x}"]
                assert {"A", "exponent", "E_inf", "r2", "ci95", "holdout_rel_error"} <= set(fit)
                assert fit["pool"] == pool and fit["task"] == task and fit["n"] == 3
    for run in metrics["runs"]:
        for key in ("zeroshot_accuracy", "retrieval_recall_1", "retrieval_recall_5",
                    "linear_probe_accuracy"):  # fmt: skip
            assert 0.0 <= run[key] <= 1.0
        assert run["retrieval_recall_1"] <= run["retrieval_recall_5"]
    assert result["fits"] == metrics["fits"]
    assert [row["task"] for row in result["comparison"]] == list(TASKS)
    row = result["comparison"][0]
    assert {
        "exponent_diverse",
        "exponent_narrow",
        "exponent_ci95_diverse",
        "exponent_ci_overlap",
    } <= set(row)


def test_csv_figures_and_tracker(study):
    root, cfg, _, result, tracker = study
    with open(Path(cfg.plots_dir) / "runs.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 6 and {"flops", "zeroshot_error", "linear_probe_error"} <= set(lines[0])
    run = result["runs"][0]
    assert float(lines[0]["zeroshot_error"]) == pytest.approx(1 - run["zeroshot_accuracy"])
    names = {Path(p).name for p in result["figures"]}
    assert {"zeroshot-diverse-vs_flops.png", "zeroshot-pools-vs_flops.png"} <= names
    assert all(Path(p).stat().st_size > 1000 for p in result["figures"])
    logged = {k for _, metrics in tracker.metrics for k in metrics}
    assert "zeroshot_accuracy/narrow/w64-l1-s256" in logged


def test_flops_and_params_grow(study):
    _, _, _, result, _ = study
    runs = {(r["pool"], r["width"], r["samples_requested"]): r for r in result["runs"]}
    for pool in ("diverse", "narrow"):
        small, more_data, bigger = runs[pool, 32, 128], runs[pool, 32, 256], runs[pool, 64, 256]
        assert small["flops"] < more_data["flops"] < bigger["flops"]
        assert more_data["flops"] == pytest.approx(2 * small["flops"])
        assert small["params"] == more_data["params"] < bigger["params"]
        assert small["samples"] == 128 and more_data["samples"] == 256


def test_layout_and_exclusions(study):
    root, cfg, _, _, _ = study
    point = cfg.grid[0]
    rdir = run_dir(cfg, "diverse", point)
    assert rdir == root / "models" / "w32-l1-s128" / "diverse"
    assert (rdir / "checkpoint.pt").exists() and (rdir / "eval.json").exists()
    assert (rdir.parent / "clipshift-vit-w32-l1-i16-p4.json").exists()
    assert len(load_eval_data(cfg).test) == 22  # two keys excluded by validate


def test_second_call_reuses_every_run(study):
    root, cfg, pretrain, first, _ = study
    files = sorted(Path(cfg.out_dir).glob("*/*/checkpoint.pt"))
    files += sorted(Path(cfg.out_dir).glob("*/*/eval.json"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_scaling(cfg, pretrain, FINETUNE, progress=False)
    assert all(r["reused"] for r in again["runs"])
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # the same results; timings only for what this call did (nothing: they are not stored in
    # models/scaling, a DVC output, but in metrics/scaling.json and MLflow)
    timings = ("train_seconds", "eval_seconds")
    assert all(r["train_seconds"] > 0 and r["eval_seconds"] > 0 for r in first["runs"])
    assert all(r["train_seconds"] is None and "eval_seconds" not in r for r in again["runs"])
    untimed = [{k: v for k, v in r.items() if k not in timings} for r in first["runs"]]
    assert [{k: v for k, v in r.items() if k not in timings} for r in again["runs"]] == [
        {**r, "reused": True} for r in untimed
    ]
    for path in Path(cfg.out_dir).glob("*/*/eval.json"):
        assert "seconds" not in path.read_text()


def test_changed_settings_retrain_the_run(study, tmp_path):
    root, cfg, pretrain, _, _ = study
    moved = cfg.model_copy(update={"out_dir": str(tmp_path / "models")})
    point = moved.grid[0]
    data = grid_inputs(moved, FINETUNE)
    first = train_and_evaluate(moved, pretrain, "narrow", point, data, progress=False)
    assert first["reused"] is False
    second = train_and_evaluate(moved, pretrain, "narrow", point, data, progress=False)
    assert second["reused"] is True
    # a pretrain setting that cannot change the weights (logging) keeps the run
    quiet = pretrain.model_copy(update={"log_every": 1000})
    assert train_and_evaluate(moved, quiet, "narrow", point, data, progress=False)["reused"]
    changed = moved.model_copy(update={"lr": 5e-4})
    third = train_and_evaluate(changed, pretrain, "narrow", point, data, progress=False)
    assert third["reused"] is False
    rdir = run_dir(moved, "narrow", point)
    spec = json.loads((rdir / "training_spec.json").read_text())
    assert spec["pretrain.lr"] == 5e-4 and spec["pretrain.init_sha256"] is None
    # the lr-2e-3 run is set aside, named, not deleted
    (aside,) = (rdir / "superseded").iterdir()
    assert json.loads((aside / "training_spec.json").read_text())["pretrain.lr"] == moved.lr
    assert (aside / "checkpoint.pt").exists()
    # a changed pretrain section reaches the runs too (its optimiser knobs are theirs)
    fourth = train_and_evaluate(
        changed, pretrain.model_copy(update={"weight_decay": 0.0}), "narrow", point, data,
        progress=False,
    )  # fmt: skip
    assert fourth["reused"] is False and len(list((rdir / "superseded").iterdir())) == 2


def test_grid_order_cheapest_first():
    cfg = ScalingConfig(grid=[ScalingRun(width=96, layers=3, samples=10),
                              ScalingRun(width=32, layers=1, samples=20),
                              ScalingRun(width=32, layers=1, samples=10),
                              ScalingRun(width=32, layers=1, samples=20)])  # fmt: skip
    order = [(pool, p.width, p.samples) for pool, p in grid_points(cfg)]
    assert order[:3] == [("diverse", 32, 10), ("diverse", 32, 20), ("diverse", 96, 10)]
    assert len(order) == 6


def test_flow_reuses_runs_and_logs_child_runs(study, mlflow_store, prefect_harness):
    import mlflow

    from flows.scaling import scaling_flow

    _, cfg, pretrain, first, _ = study
    result = scaling_flow(config=cfg, pretrain=pretrain, finetune=FINETUNE)
    assert result["fits"] == first["fits"]  # every run reused: same numbers, no training
    assert json.loads(Path(cfg.metrics_path).read_text())["fits"] == first["fits"]
    client = mlflow.MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("clipshift")
    children = client.search_runs(
        [exp.experiment_id], filter_string="tags.`clipshift.scaling_run` = 'w64-l1-s256'"
    )
    assert sorted(r.data.tags["clipshift.pool"] for r in children) == ["diverse", "narrow"]
    stage = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert stage.data.tags["clipshift.stage"] == "scaling"
    assert "fits.zeroshot_diverse_vs_flops.exponent" in stage.data.metrics
    assert children[0].data.metrics["zeroshot_accuracy"] >= 0.0
