"""Zero-shot heads agree with open_clip; classifiers and their checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from clipshift.checkpoints import sidecar_path
from clipshift.classifier import (
    classifier_from_state,
    clip_classifier,
    extract_features,
    load_classifier,
    predict_logits,
    save_classifier,
    to_model_input,
)
from clipshift.errors import CheckpointError, ConfigError
from clipshift.methods.zeroshot import fill_templates, zeroshot_head
from tests.test_finetune import CLASSES, tiny_bundle, toy_data

TEMPLATES = ["a photo of a {}.", "an emoji of a {}.", "a {}."]


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=1)


def test_zeroshot_head_matches_open_clip(bundle):
    ours = zeroshot_head(bundle.model, bundle.tokenizer, CLASSES, TEMPLATES, batch_size=5)
    theirs = build_zero_shot_classifier(
        bundle.model, bundle.tokenizer, CLASSES, TEMPLATES, num_classes_per_batch=3
    )
    assert ours.shape == (len(CLASSES), bundle.model.text_projection.shape[1])
    assert torch.allclose(ours, theirs.T, atol=1e-6)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(CLASSES)), atol=1e-6)


def test_templates_need_a_slot():
    assert fill_templates(["a", "b"], ["x {}", "y {}"]) == ["x a", "y a", "x b", "y b"]
    with pytest.raises(ConfigError, match="'\\{\\}'"):
        fill_templates(["a"], ["no slot"])


def test_zeroshot_classifier_logits_are_clip_logits(bundle):
    head = zeroshot_head(bundle.model, bundle.tokenizer, CLASSES, TEMPLATES)
    clf = clip_classifier(bundle.model, head)
    images = toy_data(2).images
    x = to_model_input(images, 32)
    with torch.no_grad():
        expected = (
            bundle.model.logit_scale.exp() * bundle.model.encode_image(x, normalize=True) @ head.T
        )
    assert torch.allclose(predict_logits(clf, images), expected, atol=1e-4)
    assert torch.equal(clf.head.bias, torch.zeros(len(CLASSES)))
    # the classifier owns a copy: training it must not touch the CLIP
    assert clf.visual is not bundle.model.visual


def test_classifier_checkpoint_round_trip(bundle, tmp_path):
    head = zeroshot_head(bundle.model, bundle.tokenizer, CLASSES, TEMPLATES)
    clf = clip_classifier(bundle.model, head)
    meta = {
        "model_name": bundle.name,
        "model_config": bundle.config,
        "classnames": CLASSES,
        "kind": "zeroshot",
        "pool": "diverse",
        "wise_alpha": None,
    }
    path = save_classifier(tmp_path / "zs.pt", clf, meta)
    assert sidecar_path(path).exists()
    loaded, meta2 = load_classifier(path)
    assert meta2["classnames"] == CLASSES and meta2["kind"] == "zeroshot"
    assert meta2["normalize_features"] is True and meta2["num_classes"] == 4
    images = toy_data(1).images
    assert torch.equal(predict_logits(loaded, images), predict_logits(clf, images))
    # a tampered file is caught by the checksum
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(path)


def test_foreign_state_is_refused():
    with pytest.raises(CheckpointError, match="not a clipshift classifier"):
        classifier_from_state({"state_dict": {}})


def test_extract_features_batches_and_restores_mode(bundle):
    visual = bundle.model.visual.train()
    images = toy_data(3).images
    a = extract_features(visual, images, batch_size=5)
    b = extract_features(visual, images, batch_size=100)
    assert a.shape == (12, 32) and torch.allclose(a, b, atol=1e-5)
    assert visual.training
    visual.eval()
    with torch.no_grad():
        direct = visual(to_model_input(images, 32))
    assert torch.allclose(F.normalize(a, dim=-1), F.normalize(direct, dim=-1), atol=1e-5)
