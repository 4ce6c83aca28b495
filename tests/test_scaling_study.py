"""The scaling stage on a tiny world: contract, reuse of finished runs (the pretrain stage's
included), shift evaluation and ER, the pool-size ablation, FLOPs, retraining."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clipshift.config import (
    FinetuneConfig,
    PoolSizeConfig,
    PretrainConfig,
    ScalingConfig,
    ScalingRun,
)
from clipshift.flops import clip_flops_per_sample
from clipshift.methods.scaling_laws import pareto_frontier
from clipshift.models import resolve_model_config
from clipshift.stages.pretrain import run_pretrain
from clipshift.stages.scaling import (
    EVAL_FILE,
    TASKS,
    family_config,
    grid_inputs,
    grid_points,
    load_eval_data,
    main_point,
    run_dir,
    run_scaling,
    train_and_evaluate,
)
from clipshift.tracking_api import RecordingTracker
from tests.test_loaders import CLASSES, build_labelled, build_pool

SIZE = 16
GRID = [(32, 1, 128), (32, 1, 256), (64, 1, 256)]
#: The "main model" of the tiny study: its pretrain run (w32-l1, 256 samples) is a grid point.
FAMILY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 32,
                   "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1,
                 "layers": 1},
}  # fmt: skip


def build_tiny_world(root: Path) -> Path:
    """Two pools, train/test/retrieval and a manifest: the layout fetch writes."""
    data = root / "fetch"
    datasets = {
        "pool-diverse": build_pool(data, n=64, seed=0, size=SIZE, name="pool-diverse"),
        "pool-narrow": build_pool(data, n=64, seed=1, size=SIZE, name="pool-narrow"),
        "retrieval": build_pool(data, n=32, seed=2, size=SIZE, name="retrieval"),
        "train": build_labelled(data, n=32, name="train", size=SIZE, seed=3),
        "test": build_labelled(data, n=24, name="test", size=SIZE, seed=4),
        "shift-a": build_labelled(data, n=20, name="shift-a", size=SIZE, seed=5),
    }
    info = json.loads((datasets["shift-a"] / "dataset.json").read_text())
    (datasets["shift-a"] / "dataset.json").write_text(json.dumps({**info, "role": "shift"}))
    manifest = {
        "task": {"classes": CLASSES},
        "datasets": {k: json.loads((p / "dataset.json").read_text()) for k, p in datasets.items()},
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


FINETUNE = FinetuneConfig()  # the evaluation protocol: default templates and linear probe


def configs(root: Path, **scaling) -> tuple[ScalingConfig, PretrainConfig]:
    """The scaling section, and a pretrain section whose model is the tiny family's."""
    model = root / "tiny-family.json"
    model.write_text(json.dumps(FAMILY))
    # evaluate's baseline line for shift-a: the identity, so ER = shift acc - ID acc
    line = {"slope": 1.0, "intercept": 0.0, "r2": 1.0, "transform": "logit"}
    (root / "evaluate.json").write_text(json.dumps({"baseline_fit": {"shift-a": line}}))
    cfg = ScalingConfig(
        data_dir=str(root / "fetch"),
        validate_dir=str(root / "validate"),
        out_dir=str(root / "models"),
        metrics_path=str(root / "metrics" / "scaling.json"),
        plots_dir=str(root / "plots"),
        grid=[ScalingRun(width=w, layers=d, samples=s) for w, d, s in GRID],
        pool_size=PoolSizeConfig(fractions=[0.5, 1.0], run=ScalingRun(width=32, layers=1,
                                                                     samples=128)),
        baseline_metrics=str(root / "evaluate.json"),
        bootstrap=50,
        **scaling,
    )  # fmt: skip
    pretrain = PretrainConfig(
        model=str(model), samples=256, batch_size=32, data_dir=str(root / "fetch"),
        out_dir=str(root / "pretrain"), warmup_steps=1, log_every=2, checkpoint_every=4,
        device="cpu",
    )  # fmt: skip
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
    for pool in pretrain.pools:  # the pretrain stage, whose runs the grid reuses
        run_pretrain(pretrain, pool, progress=False)
    tracker = RecordingTracker()
    result = run_scaling(cfg, pretrain, FINETUNE, tracker=tracker, progress=False)
    return root, cfg, pretrain, result, tracker


def _point(row: dict) -> ScalingRun:
    return ScalingRun(width=row["width"], layers=row["layers"], samples=row["samples_requested"])


def test_metrics_contract(study):
    root, cfg, _, result, _ = study
    metrics = json.loads(Path(cfg.metrics_path).read_text())
    assert set(metrics) == {"fits", "fits_all_runs", "runs", "pool_size", "findings"}
    assert len(metrics["runs"]) == 6  # the pretrain run is the grid's (32, 1, 256): once
    for pool in cfg.pools:
        for task in ("zeroshot", "retrieval"):  # a probe can reach 100 %: no error to fit
            for x in ("flops", "samples", "params_non_embedding"):
                fit = metrics["fits_all_runs"][f"{task}/{pool}/vs_{x}"]
                assert {"A", "exponent", "E_inf", "r2", "ci95", "holdout_rel_error"} <= set(fit)
                assert fit["pool"] == pool and fit["task"] == task and fit["n"] == 3
    for run in metrics["runs"]:
        # measured on exactly the 22 test images validate kept, and the 20 of shift-a
        for key, n in (("zeroshot_accuracy", 22), ("linear_probe_accuracy", 22)):
            assert run[key] * n == pytest.approx(round(run[key] * n), abs=1e-4), key
        shift = run["zeroshot_shift_accuracy"]["shift-a"]
        assert shift * 20 == pytest.approx(round(shift * 20), abs=1e-4)
        assert run["retrieval_recall_1"] <= run["retrieval_recall_5"]
        assert "zeroshot_per_class" not in run  # the bootstrap's input stays in eval.json
        stored = json.loads((run_dir(cfg, run["pool"], _point(run)) / EVAL_FILE).read_text())
        per_class = stored["metrics"]["zeroshot_per_class"]
        assert sum(per_class["total"]) == 22
        assert sum(per_class["correct"]) == pytest.approx(run["zeroshot_accuracy"] * 22)
    assert result["fits"] == metrics["fits"]
    assert [row["task"] for row in result["comparison"]] == list(TASKS)


def test_frontier_flags_and_findings(study):
    """on_frontier is the Pareto rule recomputed from the rows; each pool's finding is its
    zero-shot frontier fit."""
    _, cfg, _, result, _ = study
    for pool in cfg.pools:
        rows = [r for r in result["runs"] if r["pool"] == pool]
        front = pareto_frontier([r["flops"] for r in rows],
                                [1 - r["zeroshot_accuracy"] for r in rows])  # fmt: skip
        assert [r["on_frontier"] for r in rows] == [i in front for i in range(len(rows))]
        fit = result["fits"].get(f"zeroshot/{pool}/vs_flops")
        finding = result["findings"].get(f"scaling_power_law_{pool}")
        if len(front) < 2:  # one frontier run: no law to fit, and no finding
            assert fit is None and finding is None
            continue
        assert fit["frontier_runs"] == [rows[i]["run"] for i in front]
        assert finding["value"] == fit["r2"]
        assert finding["holdout_rel_error"] == fit["holdout_rel_error"]
        assert finding["frontier_runs"] == fit["frontier_runs"]
        # the class bootstrap gives an interval at any frontier size; over points, needs 5
        assert finding["ci95"] == fit["r2_class_ci95"] and finding["ci95"] is not None
        lo, hi = finding["ci95"]
        assert lo <= hi <= 1.0
        assert finding["r2_ci95_over_points"] is None
        assert "frontier points" in finding["r2_ci95_over_points_note"]


def test_effective_robustness_uses_evaluates_line(study):
    _, _, _, result, _ = study
    for run in [*result["runs"], *result["pool_size"]]:
        shift, id_acc = run["zeroshot_shift_accuracy"]["shift-a"], run["zeroshot_accuracy"]
        # identity line (logit space, accuracies clipped to [1e-3, 1 - 1e-3])
        assert run["effective_robustness"]["shift-a"] == pytest.approx(shift - id_acc, abs=1e-3)
        assert run["effective_robustness_avg"] == run["effective_robustness"]["shift-a"]


def test_pretrain_run_is_reused_not_retrained(study):
    root, cfg, pretrain, result, _ = study
    main = main_point(pretrain)
    assert (main.width, main.layers, main.samples) == (32, 1, 256)
    for pool in cfg.pools:
        (row,) = [r for r in result["runs"] if r["pool"] == pool and r["run"] == "w32-l1-s256"]
        assert row["reused"] is True and row["train_seconds"] is None
        assert row["reused_from"] == str(root / "pretrain" / pool)
        here = run_dir(cfg, pool, main)
        assert (here / "eval.json").exists() and not (here / "checkpoint.pt").exists()


def test_pool_size_ablation_nested_equal_compute(study):
    root, cfg, _, result, _ = study
    rows = {(r["pool"], r["fraction"]): r for r in result["pool_size"]}
    assert set(rows) == {(p, f) for p in cfg.pools for f in (0.5, 1.0)}
    for pool in cfg.pools:
        half, full = rows[pool, 0.5], rows[pool, 1.0]
        assert (half["pool_pairs"], full["pool_pairs"]) == (32, 64)
        assert half["samples"] == full["samples"] == 128 and half["flops"] == full["flops"]
        grid = [r for r in result["runs"] if r["pool"] == pool and r["run"] == "w32-l1-s128"]
        assert full["zeroshot_accuracy"] == grid[0]["zeroshot_accuracy"]  # the grid run
        spec = json.loads((run_dir(cfg, pool, cfg.pool_size.run, 0.5)
                           / "training_spec.json").read_text())  # fmt: skip
        assert spec["scaling.pool_subset"]["pairs"] == 32
    with open(Path(cfg.plots_dir) / "pool_size.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_csv_figures_and_tracker(study):
    root, cfg, _, result, tracker = study
    with open(Path(cfg.plots_dir) / "runs.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 6 and {"flops", "zeroshot_error", "linear_probe_error"} <= set(lines[0])
    run = result["runs"][0]
    assert float(lines[0]["zeroshot_error"]) == pytest.approx(1 - run["zeroshot_accuracy"])
    assert "acc_shift-a" in lines[0] and "er_shift-a" in lines[0]
    names = {Path(p).name for p in result["figures"]}
    assert {"er-vs_flops.png", "pool_size.png"} <= names
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
        assert small["params_non_embedding"] < bigger["params_non_embedding"]
        # the token table (49408 × text width) is what params_non_embedding leaves out
        assert small["params"] - small["params_non_embedding"] == 49408 * 32
        assert small["samples"] == 128 and more_data["samples"] == 256


def test_layout_and_exclusions(study):
    root, cfg, _, _, _ = study
    point = cfg.grid[0]
    rdir = run_dir(cfg, "diverse", point)
    assert rdir == root / "models" / "w32-l1-s128" / "diverse"
    assert (rdir / "checkpoint.pt").exists() and (rdir / "eval.json").exists()
    assert (rdir.parent / "tiny-family-w32-l1.json").exists()
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
    trained = [r for r in first["runs"] if not r["reused_from"]]
    assert len(trained) == 4 and all(r["train_seconds"] > 0 for r in trained)
    assert all(r["eval_seconds"] > 0 for r in first["runs"])
    assert all(r["reused"] for r in again["pool_size"])
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
    data = grid_inputs(moved, FINETUNE, pretrain)
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
    assert json.loads((aside / "training_spec.json").read_text())["pretrain.lr"] == pretrain.lr
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
    assert "fits_all_runs.zeroshot_diverse_vs_flops.exponent" in stage.data.metrics
    assert children[0].data.metrics["zeroshot_accuracy"] >= 0.0


def test_default_grid_holds_the_default_pretrain_run_in_its_family():
    cfg, pretrain = ScalingConfig(), PretrainConfig()
    main = main_point(pretrain)
    assert (main.width, main.layers, main.samples) == (128, 4, pretrain.samples)
    points = [p for pool, p in grid_points(cfg, pretrain) if pool == "diverse"]
    assert main in points and len(points) == len(cfg.grid) + 1
    name, base = resolve_model_config(pretrain.model)
    assert family_config(base, 128, 4) == base  # the main model is its own family member
    flops = set()
    for p in points:
        member = family_config(base, p.width, p.layers)
        for key in ("patch_size", "image_size", "head_width"):
            assert member["vision_cfg"][key] == base["vision_cfg"][key]
        text = member["text_cfg"]
        assert text["context_length"] == base["text_cfg"]["context_length"]
        assert text["width"] == member["embed_dim"] == p.width and text["layers"] == p.layers
        assert text["width"] // text["heads"] == 32  # the main model's text head width
        flops.add(clip_flops_per_sample(member)["total"] * p.samples)
    assert len(flops) >= 5  # enough distinct compute for a frontier fit, its CI and hold-out


def test_one_worker_plans_nothing_up_front(monkeypatch):
    """With one worker each task plans and trains its own point: planning every point first
    would only be done twice."""
    import clipshift.stages.scaling as scaling

    def no_plan(*args, **kwargs):
        raise AssertionError("planned with one worker")

    monkeypatch.setenv("CLIPSHIFT_WORKERS", "1")
    monkeypatch.setattr(scaling, "training_plan", no_plan)
    points = [("p", ScalingRun(width=32, layers=1, samples=64), 1.0)] * 2
    trained = scaling.train_side_by_side(ScalingConfig(), PretrainConfig(), points, None, False)
    assert trained == [None, None]
