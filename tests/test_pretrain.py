"""Contrastive pretraining: learning, outputs, exact resume, accumulation, the spike guard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import open_clip
import pytest
import torch

from clipshift import train_utils as T
from clipshift.checkpoints import latest_checkpoint, load_checkpoint
from clipshift.config import PretrainConfig
from clipshift.errors import ConfigError
from clipshift.stages.pretrain import TIMING_KEYS, TrainHooks, run_pretrain
from clipshift.tracking_api import RecordingTracker
from tests.tiny import toy_pretrain_cfg, toy_pretrain_world, tree_diff

MODEL = "clipshift-test-pt-w32"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_omp_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return toy_pretrain_world(tmp_path_factory.mktemp("pretrain"), MODEL)


def make_cfg(world: Path, out: Path, **kw) -> PretrainConfig:
    return toy_pretrain_cfg(world, out, MODEL, **{**kw})


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "toy" / "checkpoint.pt")["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


class Crash(Exception):
    pass


def crash_at(step: int) -> TrainHooks:
    def after_step(current: int, model) -> None:
        if current == step:
            raise Crash(f"simulated kill after step {step}")

    return TrainHooks(after_step=after_step)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run that several tests compare against."""
    out = tmp_path_factory.mktemp("ref")
    tracker = RecordingTracker()
    metrics = run_pretrain(make_cfg(world, out), "toy", tracker=tracker, progress=False)
    return out, {"metrics": metrics, "tracker": tracker}


def test_learns_and_writes_outputs(world, reference):
    out, ref = reference
    history = json.loads((out / "toy" / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"] - 0.3  # the toy pool is learnable
    metrics = json.loads((out / "toy" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["samples"] == 256 and metrics["loader"] == "memory"
    assert ref["metrics"]["samples_per_s"] > 0 and metrics["params"] > 0
    assert metrics["flops_per_sample"] > 0 and metrics["rollbacks"] == 0
    logged = ref["tracker"].metrics
    assert {"loss", "logit_scale", "lr", "grad_norm", "samples_per_s"} <= set(logged[0][1])
    # warmup then cosine decay
    lrs = [r["lr"] for r in history]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]
    # the final open_clip checkpoint loads with the stock call by name
    model, _, _ = open_clip.create_model_and_transforms(
        MODEL, pretrained=str(out / "toy" / "checkpoint.pt")
    )
    assert_bitwise_equal(model.state_dict(), final_state(out))
    assert json.loads((out / "toy" / f"{MODEL}.json").read_text())["embed_dim"] == 32
    # only the final resume state is kept
    assert [p.name for p in (out / "toy" / "resume").glob("*.pt")] == ["step-000008.pt"]


def test_resume_after_crash_is_bitwise_identical(world, reference, tmp_path):
    ref_out, _ = reference
    cfg = make_cfg(world, tmp_path)
    with pytest.raises(Crash):
        run_pretrain(cfg, "toy", progress=False, hooks=crash_at(5))  # last checkpoint: step 3
    assert latest_checkpoint(tmp_path / "toy" / "resume").name == "step-000003.pt"
    tracker = RecordingTracker()
    resumed = run_pretrain(cfg, "toy", tracker=tracker, progress=False)
    assert tracker.metrics[0][0] == 4  # resumed at step 3, so the first new log is step 4
    # the timings of the cut-off run's first 3 steps came back from its resume state
    assert [r["step"] for r in resumed["throughput"]] == list(range(1, 9))
    assert_bitwise_equal(final_state(tmp_path), final_state(ref_out))
    ours = json.loads((tmp_path / "toy" / "history.json").read_text())
    theirs = json.loads((ref_out / "toy" / "history.json").read_text())
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]


def test_rerun_gives_byte_identical_outputs_with_timings_only_in_the_result(world, tmp_path):
    """models/pretrain/<pool> is a DVC output: the same spec gives the same bytes, so timings
    (train/wall time, throughput) are returned for metrics/ and MLflow, not written."""
    cfg = make_cfg(world, tmp_path / "run")
    first = run_pretrain(cfg, "toy", progress=False)
    (tmp_path / "run").rename(tmp_path / "first")
    second = run_pretrain(cfg, "toy", progress=False)
    assert tree_diff(tmp_path / "first", tmp_path / "run") == []
    for result in (first, second):
        assert result["train_time_s"] > 0 and result["wall_time_s"] >= result["train_time_s"]
        assert result["samples_per_s"] > 0 and len(result["throughput"]) == 8
    out = tmp_path / "run" / "toy"
    for name in ("metrics.json", "history.json"):
        text = (out / name).read_text()
        assert not any(key in text for key in TIMING_KEYS), name
    (final,) = (out / "resume").glob("*.pt")
    assert "timings" not in load_checkpoint(final)
    again = run_pretrain(cfg, "toy", progress=False)  # finished: reused, nothing timed
    assert again["reused"] and all(again[k] is None for k in TIMING_KEYS)


def test_accumulation_matches_one_big_batch(world, tmp_path):
    cfg = dict(samples=32 * 3, checkpoint_every=100, log_every=1)
    one = run_pretrain(make_cfg(world, tmp_path / "a", **cfg), "toy", progress=False)
    two = run_pretrain(make_cfg(world, tmp_path / "b", accum_steps=2, **cfg), "toy", progress=False)
    h1 = json.loads((tmp_path / "a" / "toy" / "history.json").read_text())
    h2 = json.loads((tmp_path / "b" / "toy" / "history.json").read_text())
    for r1, r2 in zip(h1, h2, strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4
    assert one["steps"] == two["steps"] == 3


def test_bad_batch_split_is_a_config_error(world, tmp_path):
    with pytest.raises(ConfigError, match="divisible by 3"):
        run_pretrain(make_cfg(world, tmp_path, accum_steps=3), "toy", progress=False)


def test_nan_loss_skips_the_step(world, tmp_path):
    def nan_at_4(step, loss):
        return loss * float("nan") if step == 4 else loss

    tracker = RecordingTracker()
    metrics = run_pretrain(
        make_cfg(world, tmp_path),
        "toy",
        tracker=tracker,
        progress=False,
        hooks=TrainHooks(transform_loss=nan_at_4),
    )
    assert metrics["skipped_steps"] == 1 and metrics["rollbacks"] == 0
    assert metrics["events"][0]["event"] == "skip" and metrics["events"][0]["step"] == 4
    assert any("guard_skip" in m for _, m in tracker.metrics)
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path).values())


def test_poisoned_weights_roll_back_with_half_lr(world, tmp_path):
    poisoned = []

    def poison(step, model):
        if step == 4 and not poisoned:  # a NaN lands in the weights once
            poisoned.append(step)
            with torch.no_grad():
                model.visual.conv1.weight[0, 0, 0, 0] = float("nan")

    tracker = RecordingTracker()
    metrics = run_pretrain(
        make_cfg(world, tmp_path),
        "toy",
        tracker=tracker,
        progress=False,
        hooks=TrainHooks(after_step=poison),
    )
    kinds = [e["event"] for e in metrics["events"]]
    assert kinds == ["skip", "skip", "rollback"] and metrics["rollbacks"] == 1
    assert any(m.get("guard_lr_scale") == 0.5 for _, m in tracker.metrics if "guard_rollback" in m)
    assert metrics["steps"] == 8
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path).values())
    history = json.loads((tmp_path / "toy" / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    assert history[-1]["lr"] == pytest.approx(0.5 * T.cosine_lr(7, 2e-3, 2, 8))


def test_loss_spike_rolls_back_then_gives_up(world, tmp_path):
    # the guard needs 10 good steps of history before it judges spikes
    seen = []

    def spike_once(step, loss):
        if step == 11 and step not in seen:
            seen.append(step)
            return loss * 100
        return loss

    cfg = make_cfg(world, tmp_path / "once", samples=32 * 13, log_every=4)
    metrics = run_pretrain(cfg, "toy", progress=False, hooks=TrainHooks(transform_loss=spike_once))
    assert [(e["event"], e["step"]) for e in metrics["events"]] == [("rollback", 11)]
    assert metrics["steps"] == 13 and metrics["rollbacks"] == 1

    def always_spike(step, loss):
        return loss * 100 if step >= 11 else loss

    cfg = make_cfg(world, tmp_path / "always", samples=32 * 13, log_every=4, max_rollbacks=1)
    with pytest.raises(T.TrainingDiverged, match="after 1 rollbacks; lower pretrain.lr"):
        run_pretrain(cfg, "toy", progress=False, hooks=TrainHooks(transform_loss=always_spike))


def test_streaming_loader_trains_and_resumes(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "a", loader="stream", workers=1, samples=32 * 5)
    run_pretrain(cfg, "toy", progress=False)
    crashed = make_cfg(world, tmp_path / "b", loader="stream", workers=1, samples=32 * 5)
    with pytest.raises(Crash):
        run_pretrain(crashed, "toy", progress=False, hooks=crash_at(4))
    metrics = run_pretrain(crashed, "toy", progress=False)
    assert metrics["loader"] == "stream" and metrics["steps"] == 5
    # same ranks and workers: the replayed stream is the same, so the weights are too
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from clipshift.config import PretrainConfig
    from clipshift.stages.pretrain import run_pretrain
    cfg = PretrainConfig.model_validate_json(open(sys.argv[1]).read())
    run_pretrain(cfg, "toy", progress=False)
""")


def run_script(cfg: PretrainConfig, path: Path) -> subprocess.Popen:
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(world, tmp_path):
    kw = dict(samples=32 * 40, checkpoint_every=10, log_every=5)
    ref = run_script(make_cfg(world, tmp_path / "ref", **kw), tmp_path / "ref.json")
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    victim = run_script(make_cfg(world, tmp_path / "kill", **kw), tmp_path / "kill.json")
    resume_dir = tmp_path / "kill" / "toy" / "resume"
    deadline = time.time() + 300
    while not (resume_dir / "step-000010.pt.sha256").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (tmp_path / "kill" / "toy" / "checkpoint.pt").exists()
    again = run_script(make_cfg(world, tmp_path / "kill", **kw), tmp_path / "kill.json")
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()
    assert_bitwise_equal(final_state(tmp_path / "kill"), final_state(tmp_path / "ref"))


def test_param_groups_and_schedule(world):
    from clipshift.models import create_clip

    model = create_clip(str(world / f"{MODEL}.json")).model
    no_decay, decay = T.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
        "ln_final.weight",
        "visual.conv1.weight",
    } - skipped == {"visual.conv1.weight"}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    lrs = [T.cosine_lr(s, 1.0, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] < 0.01


def test_bf16_unsupported_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100.*fp16"):
        T.check_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(world, tmp_path, precision):
    metrics = run_pretrain(
        make_cfg(world, tmp_path, precision=precision, samples=32 * 3), "toy", progress=False
    )
    assert metrics["steps"] == 3 and math.isfinite(metrics["final_loss"])
