"""Fang et al.'s control (a): CLIP's image tower trained with cross-entropy on a pool's emoji.

The toy world: a pool of coloured shapes over 8 'emoji' (codepoints c0..c7); the task holds 5
of them in another order, so a wrong codepoint → task-class mapping scores near chance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from clipshift.classifier import ImageClassifier, load_classifier, make_head
from clipshift.config import PretrainConfig, SupervisedConfig, load_params
from clipshift.data.shards import DatasetInfo, ShardWriter
from clipshift.errors import ConfigError, DataError
from clipshift.methods.supervised import UNSEEN_LOGIT, restrict_head, task_classifier
from clipshift.models import tiny_vit_config
from clipshift.registry import read_indices
from clipshift.stages.evaluate import evaluate_models
from clipshift.stages.supervised import build_tower, load_pool_labels, run_supervised
from tests.test_loaders import CLASSES, toy_image
from tests.tiny import full_params

MODEL = "clipshift-test-sup-w32"
POOL_CODES = [f"c{i}" for i in range(len(CLASSES))]
TASK = [5, 1, 7, 2, 0]  # task class j is pool emoji TASK[j]

pytestmark = pytest.mark.usefixtures("one_omp_thread")


def _write(root: Path, name: str, role: str, labels: list[int], seed: int, task: bool) -> None:
    rng = random.Random(seed)
    classes = [CLASSES[i] for i in TASK] if task else None
    info = DatasetInfo(name=name, role=role, num_samples=0, classes=classes, image_size=32)
    with ShardWriter(root / name, info, shard_size=64) as writer:
        for i, label in enumerate(labels):
            emoji = TASK[label] if task else label
            sample = {
                "__key__": f"{name}-{i:04d}",
                "png": toy_image(emoji, rng),
                "txt": f"a {CLASSES[emoji]}",
                "json": {"codepoint": POOL_CODES[emoji]},
            }
            if task:
                sample["cls"] = label
            writer.write(sample)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("supervised")
    data = root / "data"
    _write(data, "pool-toy", "pool", [i % len(CLASSES) for i in range(128)], 0, task=False)
    _write(data, "val", "val", [i % len(TASK) for i in range(40)], 1, task=True)
    task = {"classes": [CLASSES[i] for i in TASK], "codepoints": [POOL_CODES[i] for i in TASK]}
    (data / "manifest.json").write_text(json.dumps({"task": task, "datasets": {}}))
    config = tiny_vit_config(32, 1, patch_size=8, context_length=16)
    (root / f"{MODEL}.json").write_text(json.dumps(config))
    return root


def configs(world: Path, out: Path, **pretrain: object) -> tuple[SupervisedConfig, PretrainConfig]:
    sup = SupervisedConfig(data_dir=str(world / "data"), out_dir=str(out), pools=["toy"])
    base = dict(
        data_dir=str(world / "data"),
        pools=["toy"],
        model=str(world / f"{MODEL}.json"),
        batch_size=32,
        samples=32 * 16,
        lr=2e-3,
        warmup_steps=2,
        log_every=2,
        device="cpu",
        seed=0,
    )
    return sup, PretrainConfig(**{**base, **pretrain})


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models") / "supervised"
    sup, pre = configs(world, out)
    return out, run_supervised(sup, pre, "toy", progress=False)


# --------------------------------------------------------------------------------------------
# the head cut to the task


def test_restricted_head_picks_the_task_class_of_each_emoji():
    pool = ["a", "b", "c", "d"]
    head = make_head(torch.eye(4) * 5.0, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    task_head, missing = restrict_head(head, pool, ["d", "b", "x", "a"])
    assert missing == ["x"]
    assert torch.equal(task_head.weight[0], head.weight[3].detach())
    assert float(task_head.bias[1].detach()) == pytest.approx(0.2)
    assert float(task_head.bias[2].detach()) == UNSEEN_LOGIT and not task_head.weight[2].any()
    # features 'emoji a, b, c, d' (one-hot): a → task 3, b → task 1, d → task 0; c is not a task
    # class and x (never shown) is never predicted
    clf, _ = task_classifier(
        ImageClassifier(nn.Identity(), head, False), pool, ["d", "b", "x", "a"]
    )
    pred = clf(torch.eye(4)).argmax(dim=1)
    assert pred[[0, 1, 3]].tolist() == [3, 1, 0]
    assert 2 not in pred.tolist()


def test_pool_labels_are_the_codepoints_in_pretrain_row_order(world):
    data = load_pool_labels(world / "data" / "pool-toy", 32)
    assert data.classes == sorted(POOL_CODES)
    assert data.keys[:3] == ["pool-toy-0000", "pool-toy-0001", "pool-toy-0002"]
    assert data.labels[:8].tolist() == list(range(8))


def test_tower_starts_from_the_pretrain_stage_initialisation(world, tmp_path):
    from clipshift.stages.pretrain import build_model

    _, pre = configs(world, tmp_path)
    ours = build_tower(pre, torch.device("cpu")).model.visual.state_dict()
    theirs = build_model(pre, torch.device("cpu")).model.visual.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------------------------
# the stage


def test_training_lowers_the_loss_and_writes_a_task_classifier(trained):
    out, result = trained
    history = json.loads((out / "toy" / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(2, 17, 2))
    assert history[-1]["loss_avg"] < history[0]["loss_avg"] - 0.5  # from ~ln 8 = 2.08
    assert result["samples"] == 512 and result["pool_classes"] == 8
    assert result["task_classes"] == 5 and result["task_classes_missing"] == []
    assert result["train_time_s"] > 0 and not result["reused"]
    # above chance (0.2) only if each task class reads its own emoji's row
    assert result["val_accuracy"] >= 0.6
    clf, meta = load_classifier(out / "toy" / "supervised-toy.pt")
    assert clf.num_classes == 5 and meta["kind"] == "supervised"
    assert meta["codepoints"] == [POOL_CODES[i] for i in TASK]
    assert result["image_train_flops"] < result["clip_train_flops"]  # no text tower
    on_disk = json.loads((out / "toy" / "metrics.json").read_text())
    assert "train_time_s" not in on_disk and on_disk["final_loss"] == result["final_loss"]


def test_evaluate_discovers_and_scores_it_like_any_classifier(trained, world):
    out, result = trained
    entries = read_indices(out.parent)  # <models_dir>/supervised/<pool>/index.json
    (entry,) = entries
    assert (entry.id, entry.kind, entry.pool) == ("supervised-toy", "supervised", "toy")
    from clipshift.data.loaders import load_labelled

    val = load_labelled(world / "data" / "val")
    acc = evaluate_models(entries, {"val": val}, batch_size=16, device="cpu")
    assert acc["supervised-toy"]["val"] == pytest.approx(result["val_accuracy"])


def test_same_seed_same_weights_and_a_finished_run_is_reused(trained, world, tmp_path):
    out, result = trained
    sup, pre = configs(world, tmp_path / "again")
    again = run_supervised(sup, pre, "toy", progress=False)
    a = load_classifier(out / "toy" / "supervised-toy.pt")[0].state_dict()
    b = load_classifier(tmp_path / "again" / "toy" / "supervised-toy.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["final_loss"] == result["final_loss"]
    reused = run_supervised(sup, pre, "toy", progress=False)
    assert reused["reused"] and reused["train_time_s"] is None
    # another seed is other work: the old run is set aside, not reused
    sup, pre = configs(world, tmp_path / "again", seed=1, samples=64)
    other = run_supervised(sup, pre, "toy", progress=False)
    assert not other["reused"] and other["final_loss"] != result["final_loss"]
    assert list((tmp_path / "again" / "toy" / "superseded").iterdir())


# --------------------------------------------------------------------------------------------
# errors


def test_unknown_pool_is_a_clear_error(world, tmp_path):
    sup, pre = configs(world, tmp_path)
    with pytest.raises(ConfigError, match="'nope' is not in supervised.pools"):
        run_supervised(sup, pre, "nope", progress=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full_params({"supervised": {"pools": ["diverse", "nope"]}})))
    with pytest.raises(ConfigError, match=r"supervised.pools lists \['nope'\]"):
        load_params(path)


def test_a_pool_without_emoji_ids_is_refused(tmp_path):
    info = DatasetInfo(name="pool-x", role="pool", num_samples=0, image_size=32)
    with ShardWriter(tmp_path / "pool-x", info, shard_size=8) as writer:
        writer.write({"__key__": "k0", "png": toy_image(0, random.Random(0)), "txt": "a"})
    with pytest.raises(DataError, match="no 'codepoint'"):
        load_pool_labels(tmp_path / "pool-x", 32)


def test_flow_writes_the_run_metrics_with_timings(world, mlflow_store, prefect_harness, tmp_path):
    from flows.supervised import supervised_flow

    sup, pre = configs(world, tmp_path / "models" / "supervised", samples=64)
    result = supervised_flow(config=sup, pretrain=pre, pool="toy")
    metrics = json.loads((tmp_path / "metrics" / "supervised" / "toy.json").read_text())
    assert metrics["final_loss"] == result["final_loss"] and metrics["train_time_s"] > 0
    assert metrics["samples"] == 64 and "task_classes_missing" not in metrics  # scalars only
