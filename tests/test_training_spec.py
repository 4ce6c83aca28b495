"""Resume and reuse only on an identical training spec (issue 14).

A finished or half-finished pretraining run, then one setting changed: every weight-determining
setting must retrain from step 0 with the new value (the earlier work set aside, named); a
setting that cannot change the weights must reuse (finished) or resume (half-finished). The
checkpoint's recorded config must always be the one it was trained with.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from clipshift.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_open_clip_checkpoint,
)
from clipshift.config import BaselineSpec, FinetuneConfig, PretrainConfig, SoupIngredient
from clipshift.models import tiny_vit_config
from clipshift.stages.finetune import run_finetune
from clipshift.stages.pretrain import TrainHooks, run_pretrain
from clipshift.tracking_api import RecordingTracker
from clipshift.training_spec import (
    SPEC_FILE,
    SUPERSEDED_DIR,
    claim_run_dir,
    describe_changes,
    section_spec,
)
from tests.test_ddp_stages import write_labelled
from tests.test_finetune import tiny_bundle, toy_data
from tests.test_loaders import build_pool
from tests.tiny import toy_pretrain_cfg, toy_pretrain_world

MODEL = "clipshift-test-spec-w32"
DEEPER = "clipshift-test-spec-w32-l2"
STEPS = 8  # toy_pretrain_cfg: 8 steps of 32, a resume checkpoint every 3
CRASH_AT = 5  # half-finished: the newest resume state is step 3


pytestmark = pytest.mark.usefixtures("one_omp_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = toy_pretrain_world(tmp_path_factory.mktemp("spec-world"), MODEL)
    deeper = tiny_vit_config(32, 2, patch_size=8, context_length=16)
    (root / f"{DEEPER}.json").write_text(json.dumps(deeper))
    return root


def cfg_for(world: Path, out: Path, **overrides: Any) -> PretrainConfig:
    return toy_pretrain_cfg(world, out, MODEL, **overrides)


class Crash(Exception):
    pass


def crash_at(step: int) -> TrainHooks:
    def after_step(current: int, model: torch.nn.Module) -> None:
        if current == step:
            raise Crash(step)

    return TrainHooks(after_step=after_step)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run_pretrain(cfg_for(world, out), "toy", progress=False)
    return out


@pytest.fixture(scope="module")
def half_finished(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("half")
    with pytest.raises(Crash):
        run_pretrain(cfg_for(world, out), "toy", progress=False, hooks=crash_at(CRASH_AT))
    assert latest_checkpoint(out / "toy" / "resume").name == "step-000003.pt"
    return out


def copy_of(source: Path, tmp_path: Path) -> Path:
    """A private copy of a run folder (out_dir is a path: it does not enter the spec)."""
    return Path(shutil.copytree(source, tmp_path / "out"))


def assert_lineage(out: Path) -> dict[str, Any]:
    """The checkpoint records the settings it was trained with: its config agrees with its
    training spec on every weight-determining setting, with the final resume state, and with
    the schedule its history shows."""
    ckpt = load_checkpoint(out / "toy" / "checkpoint.pt")
    spec, config = ckpt["training_spec"], ckpt["pretrain_config"]
    for key in PretrainConfig.model_fields.keys() - PretrainConfig.RESULT_NEUTRAL:
        assert spec[f"pretrain.{key}"] == config[key], key
    state = load_checkpoint(latest_checkpoint(out / "toy" / "resume"))
    assert state["training_spec"] == spec and state["config"] == config
    assert json.loads((out / "toy" / SPEC_FILE).read_text()) == spec
    history = json.loads((out / "toy" / "history.json").read_text())
    assert ckpt["step"] == config["samples"] // config["batch_size"] == history[-1]["step"]
    peak = max(r["lr"] for r in history)
    assert peak == pytest.approx(config["lr"], rel=1e-6)  # warmup ends at the peak LR
    return ckpt


# --------------------------------------------------------------------------------------------
# the spec itself


def test_every_setting_is_either_in_the_spec_or_declared_neutral():
    for model in (PretrainConfig, FinetuneConfig):
        assert model.RESULT_NEUTRAL <= model.model_fields.keys(), "a neutral name is misspelt"
    spec = section_spec("pretrain", PretrainConfig())
    determining = {k.removeprefix("pretrain.") for k in spec}
    assert determining | PretrainConfig.RESULT_NEUTRAL == PretrainConfig.model_fields.keys()
    # the settings people change most must never be neutral
    assert {"lr", "batch_size", "samples", "seed", "precision", "accum_steps"} <= determining


def test_describe_changes_names_each_setting_and_both_values():
    before = {"pretrain.lr": 0.001, "pretrain.seed": 0, "pretrain.batch_size": 32}
    after = {"pretrain.lr": 0.002, "pretrain.seed": 0, "pretrain.batch_size": 64}
    text = describe_changes(before, after)
    assert text == "pretrain.batch_size 32 → 64, pretrain.lr 0.001 → 0.002"
    assert "older clipshift" in describe_changes(None, after)


def test_claim_keeps_matching_work_and_sets_aside_the_rest(tmp_path, caplog):
    run = tmp_path / "run"
    spec = {"pretrain.lr": 0.001}
    assert claim_run_dir(run, spec, "t") is None  # empty: nothing to move
    (run / "checkpoint.pt").write_bytes(b"weights of lr 0.001")
    assert claim_run_dir(run, spec, "t") is None
    assert (run / "checkpoint.pt").read_bytes() == b"weights of lr 0.001"
    with caplog.at_level(logging.WARNING):
        moved = claim_run_dir(run, {"pretrain.lr": 0.002}, "pretrain toy")
    assert "pretrain.lr 0.001 → 0.002" in caplog.text
    assert moved.parent == run / SUPERSEDED_DIR
    assert (moved / "checkpoint.pt").read_bytes() == b"weights of lr 0.001"
    assert json.loads((moved / SPEC_FILE).read_text()) == spec
    assert sorted(p.name for p in run.iterdir()) == sorted([SPEC_FILE, SUPERSEDED_DIR])
    assert json.loads((run / SPEC_FILE).read_text()) == {"pretrain.lr": 0.002}


def test_superseded_work_is_invisible_to_dvc():
    patterns = (Path(__file__).resolve().parents[1] / ".dvcignore").read_text().split()
    assert f"{SUPERSEDED_DIR}/" in patterns


# --------------------------------------------------------------------------------------------
# pretraining: a changed weight-determining setting retrains from step 0


DETERMINING: dict[str, Any] = {
    "lr": 3e-3,
    "weight_decay": 0.05,
    "beta1": 0.8,
    "beta2": 0.95,
    "eps": 1e-8,
    "warmup_steps": 3,
    "grad_clip_norm": 0.5,
    "accum_steps": 2,
    "precision": "bf16",
    "batch_size": 64,
    "samples": 32 * 6,
    "seed": 1,
    "checkpoint_every": 2,
    "max_rollbacks": 1,
    "spike_factor": 4.0,
    "gather_with_grad": True,
    "local_loss": True,
    "model": DEEPER,
    "init_checkpoint": "finished",
}


def changed_cfg(world: Path, out: Path, key: str, finished: Path) -> PretrainConfig:
    value = DETERMINING[key]
    if key == "model":  # toy_pretrain_cfg's own `model` argument names the base model
        base = cfg_for(world, out).model_dump()
        return PretrainConfig.model_validate({**base, "model": str(world / f"{value}.json")})
    if key == "init_checkpoint":  # another run's weights as the starting point
        value = str(finished / "toy" / "checkpoint.pt")
    return cfg_for(world, out, **{key: value})


@pytest.mark.parametrize("before", ["finished", "half_finished"])
@pytest.mark.parametrize("key", sorted(DETERMINING))
def test_changed_setting_trains_from_step_0_with_the_new_value(
    world, finished, half_finished, before, key, tmp_path
):
    out = copy_of(finished if before == "finished" else half_finished, tmp_path)
    old = (out / "toy" / "resume").iterdir()
    old_names = sorted(p.name for p in old)
    cfg = changed_cfg(world, out, key, finished)
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg, "toy", tracker=tracker, progress=False)
    assert metrics["reused"] is False
    assert tracker.metrics[0][0] == 1  # the first logged step: trained from step 0
    assert metrics["steps"] == cfg.samples // cfg.batch_size
    ckpt = assert_lineage(out)
    if key not in ("model", "init_checkpoint"):
        assert ckpt["pretrain_config"][key] == getattr(cfg, key)
    # the earlier work is set aside, named, with the tag saying where
    (aside,) = (out / "toy" / SUPERSEDED_DIR).iterdir()
    assert sorted(p.name for p in (aside / "resume").iterdir()) == old_names
    assert tracker.tags["clipshift.superseded"] == str(aside)


def test_changed_lr_is_the_new_model_not_the_old_one(world, finished, tmp_path):
    """The reported failure: lr 2e-3 → 3e-3 after a finished run came back with the old weights."""
    out = copy_of(finished, tmp_path)
    run_pretrain(cfg_for(world, out, lr=3e-3), "toy", progress=False)
    fresh = tmp_path / "fresh"
    run_pretrain(cfg_for(world, fresh, lr=3e-3), "toy", progress=False)
    ours = load_checkpoint(out / "toy" / "checkpoint.pt")["state_dict"]
    theirs = load_checkpoint(fresh / "toy" / "checkpoint.pt")["state_dict"]
    old = load_checkpoint(finished / "toy" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], old[k]) for k in ours)


def test_re_made_pool_retrains(tmp_path):
    own = toy_pretrain_world(tmp_path / "world", MODEL)
    cfg = cfg_for(own, tmp_path / "out")
    with pytest.raises(Crash):
        run_pretrain(cfg, "toy", progress=False, hooks=crash_at(CRASH_AT))
    build_pool(own, n=64, seed=1, name="pool-toy")  # fetch re-made the pool
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg, "toy", tracker=tracker, progress=False)
    assert tracker.metrics[0][0] == 1 and metrics["steps"] == STEPS
    spec = assert_lineage(tmp_path / "out")["training_spec"]
    (aside,) = (tmp_path / "out" / "toy" / SUPERSEDED_DIR).iterdir()
    old_spec = json.loads((aside / SPEC_FILE).read_text())
    assert old_spec["pretrain.pool_fingerprint"] != spec["pretrain.pool_fingerprint"]


def test_work_without_a_recorded_spec_is_set_aside(world, finished, tmp_path):
    """Runs written before specs were recorded (or copied in by hand) are never resumed."""
    out = copy_of(finished, tmp_path)
    (out / "toy" / SPEC_FILE).unlink()
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg_for(world, out), "toy", tracker=tracker, progress=False)
    assert metrics["reused"] is False and tracker.metrics[0][0] == 1
    (aside,) = (out / "toy" / SUPERSEDED_DIR).iterdir()
    assert aside.name.endswith("-unrecorded") and (aside / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# pretraining: a setting that cannot change the weights reuses or resumes


NEUTRAL: dict[str, Any] = {
    "log_every": 2,
    "workers": 0,  # the in-memory loader has no workers in its sample order
    "device": "cpu",  # what 'auto' resolves to here
    "loader": "memory",  # likewise
    "pools": ["toy", "another"],
}


@pytest.mark.parametrize("key", sorted(NEUTRAL))
def test_neutral_change_reuses_a_finished_run(world, finished, key, tmp_path):
    out = copy_of(finished, tmp_path)
    ckpt = out / "toy" / "checkpoint.pt"
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg_for(world, out, **{key: NEUTRAL[key]}), "toy", tracker, False)
    assert metrics["reused"] is True and tracker.tags["clipshift.reused"] == "true"
    assert tracker.metrics == []  # nothing trained
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before
    assert not (out / "toy" / SUPERSEDED_DIR).exists()
    assert_lineage(out)


@pytest.mark.parametrize("key", ["log_every", "workers"])
def test_neutral_change_resumes_a_half_finished_run(world, finished, half_finished, key, tmp_path):
    out = copy_of(half_finished, tmp_path)
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg_for(world, out, **{key: NEUTRAL[key]}), "toy", tracker, False)
    assert metrics["reused"] is False and min(step for step, _ in tracker.metrics) > 3
    ours = load_checkpoint(out / "toy" / "checkpoint.pt")["state_dict"]
    theirs = load_checkpoint(finished / "toy" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # as if never interrupted
    assert not (out / "toy" / SUPERSEDED_DIR).exists()


def test_moved_data_folder_is_the_same_data(world, finished, tmp_path):
    """data_dir is a path: the same pool elsewhere is the same training data."""
    moved = Path(shutil.copytree(world, tmp_path / "moved-world"))
    out = copy_of(finished, tmp_path)
    cfg = cfg_for(world, out).model_copy(update={"data_dir": str(moved)})
    assert run_pretrain(cfg, "toy", progress=False)["reused"] is True


def test_stream_loader_workers_determine_the_order(world, tmp_path):
    cfg = cfg_for(world, tmp_path, loader="stream", workers=1, samples=32 * 3)
    run_pretrain(cfg, "toy", progress=False)
    again = run_pretrain(cfg.model_copy(update={"log_every": 3}), "toy", progress=False)
    assert again["reused"] is True
    tracker = RecordingTracker()
    other = run_pretrain(cfg.model_copy(update={"workers": 2}), "toy", tracker, False)
    assert other["reused"] is False and tracker.metrics[0][0] == 1
    assert (tmp_path / "toy" / SUPERSEDED_DIR).is_dir()


# --------------------------------------------------------------------------------------------
# fine-tuning: outputs record their spec; a changed spec never leaves old models beside new


@pytest.fixture(scope="module")
def finetune_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune-spec")
    for i, name in enumerate(["train", "val"]):
        write_labelled(root / "data", name, name, toy_data(8 if name == "train" else 4, seed=i))
    bundle = tiny_bundle(seed=0)
    ckpt = root / "pretrain" / "diverse" / "checkpoint.pt"
    save_open_clip_checkpoint(ckpt, bundle.model, bundle.name, bundle.config)
    return root


def finetune_cfg(root: Path, out: Path, **kw: Any) -> FinetuneConfig:
    base: dict[str, Any] = dict(
        data_dir=str(root / "data"),
        pretrain_dir=str(root / "pretrain"),
        out_dir=str(out),
        pool="diverse",
        e2e_epochs=1,
        e2e_batch_size=16,
        e2e_lr=1e-3,
        soup_ingredients=[SoupIngredient(lr=5e-4, epochs=1)] * 3,
        linear_epochs=5,
        knn_k=3,
        baselines=[BaselineSpec(width=32, layers=1, epochs=1, fraction=1.0)] * 3,
        templates=["a {}."],
    )
    return FinetuneConfig(**{**base, **kw})


def test_finetune_outputs_match_their_settings(finetune_world, tmp_path):
    finetune_world = Path(shutil.copytree(finetune_world, tmp_path / "world"))
    out = tmp_path / "finetune"
    run_finetune(finetune_cfg(finetune_world, out), progress=False)
    old = load_checkpoint(out / "finetuned-diverse-0.pt")
    assert old["meta"]["training_spec"]["finetune.e2e_lr"] == 1e-3
    assert (out / "finetuned-diverse-1.pt").exists()  # a soup ingredient at 5e-4

    run_finetune(
        finetune_cfg(finetune_world, out, e2e_lr=2e-3, soup_ingredients=[]), progress=False
    )
    new = load_checkpoint(out / "finetuned-diverse-0.pt")
    assert new["meta"]["training_spec"]["finetune.e2e_lr"] == 2e-3 and new["meta"]["lr"] == 2e-3
    weights = old["state_dict"]
    assert not all(torch.equal(new["state_dict"][k], weights[k]) for k in weights)
    # the old run's extra ingredient is not left beside the new models: it is set aside
    assert not (out / "finetuned-diverse-1.pt").exists()
    (aside,) = (out / SUPERSEDED_DIR).iterdir()
    assert (aside / "finetuned-diverse-1.pt").exists()
    for path in out.glob("*.pt"):  # every model the stage wrote records this run's spec
        assert load_checkpoint(path)["meta"]["training_spec"] == new["meta"]["training_spec"]

    # a path or worker count is not a new experiment: nothing more is set aside
    run_finetune(
        finetune_cfg(finetune_world, out, e2e_lr=2e-3, soup_ingredients=[], workers=0),
        progress=False,
    )
    assert len(list((out / SUPERSEDED_DIR).iterdir())) == 1
    # a re-trained pretrained model is: its bytes are part of the spec
    ckpt = finetune_world / "pretrain" / "diverse" / "checkpoint.pt"
    pretrained = load_checkpoint(ckpt)
    pretrained["state_dict"]["logit_scale"] += 1.0
    save_checkpoint(ckpt, pretrained)
    run_finetune(
        finetune_cfg(finetune_world, out, e2e_lr=2e-3, soup_ingredients=[]), progress=False
    )
    assert len(list((out / SUPERSEDED_DIR).iterdir())) == 2
