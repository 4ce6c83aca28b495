"""The README's ImageNet worked example on locally built files in ImageNet layout.

A tiny "val" (one folder per WordNet id), an ImageNet-R-like shift that covers a subset of the
classes, and an ImageNet-Sketch-like shift with every class, all fetched from a params.yaml
(the README snippet, with local paths) and evaluated with a zero-shot model. ImageNet-R/-A are
scored over their own classes only (the model's logits are masked to the subset, as in their
papers' protocol); the test checks that against a hand computation, with a head that prefers a
class outside the subset so that unmasked scoring would give a different (zero) accuracy.
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from clipshift.classifier import predict_logits, save_classifier
from clipshift.config import load_params
from clipshift.data.loaders import load_labelled
from clipshift.methods.metrics import masked_argmax
from clipshift.registry import ModelEntry, write_index
from clipshift.stages.evaluate import run_evaluate
from clipshift.stages.fetch import run_fetch
from tests.test_finetune import tiny_bundle, zs_classifier
from tests.tiny import full_params

WNIDS = {  # their ImageNet classes 0-4, as open_clip names them
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}
R_SUBSET = ["n01443537", "n01491361"]  # the folders the -R-like set has (ImageNet-R: 200)
PREFERRED = "tench"  # not in the -R subset: the head's bias makes it win unless masked


def image_folder(root: Path, wnids: list[str], per_class: int, ext: str, seed: int) -> Path:
    """``root/<wnid>/<wnid>_<i>.<ext>``: ImageNet val (after valprep) and its shifts."""
    rng = random.Random(seed)
    for c, wnid in enumerate(sorted(wnids)):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(min(255, 40 * c + rng.randrange(60)) for _ in range(3))
            Image.new("RGB", (40, 36), colour).save(root / wnid / f"{wnid}_{i}.{ext}")
    return root


def params_yaml(root: Path) -> str:
    """The repository's params.yaml edited as the README snippet says (``class_map: imagenet``,
    no hand-written map), pointed at the local trees (there: s3:// prefixes and real paths);
    the other paths are the defaults, relative to the working directory."""
    text = textwrap.dedent(f"""\
        fetch:
          use_world: false
          sources:
          - name: imagenet-r
            uri: {root}/imagenet-r
            role: shift
            format: imagefolder
            class_map: imagenet
          - name: imagenet-val
            uri: {root}/imagenet/val
            role: test
            format: imagefolder
            class_map: imagenet
          - name: imagenet-sketch
            uri: {root}/imagenet-sketch
            role: shift
            format: imagefolder
            class_map: imagenet
        evaluate:
          external_baselines: testbed.csv
          external_mode: replace
          register_model: false
        """)
    snippet = yaml.safe_load(text)
    return yaml.safe_dump(full_params(snippet))


def zero_shot_model(models: Path, classes: list[str]):
    """A tiny CLIP's zero-shot classifier over the task classes, indexed for evaluate."""
    bundle = tiny_bundle()
    clf = zs_classifier(bundle, classes)
    with torch.no_grad():
        clf.head.bias[classes.index(PREFERRED)] = 1e4
    meta = {"model_config": bundle.config, "classnames": classes, "kind": "zeroshot"}
    save_classifier(models / "zeroshot" / "zs-tiny.pt", clf, meta)
    write_index(models / "zeroshot", [ModelEntry(id="zs-tiny", kind="zeroshot", path="zs-tiny.pt")])
    return clf


def hand_accuracy(clf, dataset: Path, subset: list[int] | None) -> float:
    data = load_labelled(dataset)
    mask = None if subset is None else torch.tensor([c in subset for c in range(len(data.classes))])
    pred = masked_argmax(predict_logits(clf, data.images), mask)
    return float((pred == data.labels).float().mean())


def test_imagenet_layout_fetch_and_evaluate_with_subset_mask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imagenet" / "val", list(WNIDS), 4, "JPEG", seed=0)
    image_folder(tmp_path / "imagenet-r", R_SUBSET, 4, "jpg", seed=1)
    image_folder(tmp_path / "imagenet-sketch", list(WNIDS), 3, "JPEG", seed=2)
    (tmp_path / "testbed.csv").write_text(
        "model,id,imagenet-r,imagenet-sketch\n"
        "resnet18,0.70,0.33,0.20\nresnet50,0.76,0.36,0.24\nvit_b16,0.81,0.45,0.30\n"
    )
    (tmp_path / "params.yaml").write_text(params_yaml(tmp_path))
    params = load_params(tmp_path / "params.yaml")

    manifest = run_fetch(params.fetch, progress=False)
    classes = manifest["task"]["classes"]
    assert classes == list(WNIDS.values())  # the val set defined the task, in ImageNet order
    r_info = manifest["datasets"]["imagenet-r"]
    assert r_info["classes"] == classes and r_info["num_samples"] == 8
    assert r_info["extra"]["class_subset"] == [classes.index(WNIDS[w]) for w in R_SUBSET]

    clf = zero_shot_model(tmp_path / "models", classes)
    summary = run_evaluate(params.evaluate, progress=False)
    assert summary["id_dataset"] == "imagenet-val"
    assert summary["shifts"] == ["imagenet-r", "imagenet-sketch"]
    assert summary["class_subsets"] == {"imagenet-r": 2}  # -Sketch covers all: no mask
    acc = summary["models"]["zs-tiny"]["accuracy"]
    data = tmp_path / "data" / "fetch"
    subset = r_info["extra"]["class_subset"]
    assert acc["imagenet-r"] == hand_accuracy(clf, data / "imagenet-r", subset)
    assert hand_accuracy(clf, data / "imagenet-r", None) == 0.0  # unmasked: always 'tench'
    assert acc["imagenet-r"] > 0.0
    assert acc["imagenet-sketch"] == hand_accuracy(clf, data / "imagenet-sketch", None)
    assert acc["imagenet-sketch"] == pytest.approx(1 / len(WNIDS))  # only tench images right
    assert set(summary["baseline_fit"]) == {"imagenet-r", "imagenet-sketch", "avg"}
    assert (tmp_path / "plots/evaluate/scatter/effective_robustness_imagenet-r.png").exists()
