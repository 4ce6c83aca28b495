"""Model registry: a classifier registered with @champion loads as pyfunc and predicts."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from clipshift import tracking
from clipshift.classifier import (
    ImageClassifier,
    build_visual,
    make_head,
    predict_logits,
    save_classifier,
)
from clipshift.models import tiny_vit_config


def _tiny_classifier(tmp_path, classes):
    torch.manual_seed(0)
    config = tiny_vit_config(32, 1, image_size=16, patch_size=8)
    clf = ImageClassifier(build_visual(config), make_head(torch.randn(len(classes), 32)))
    path = save_classifier(
        tmp_path / "clf.pt", clf, {"model_config": config, "classnames": classes, "kind": "wiseft"}
    )
    return clf, path


def test_registered_champion_predicts_like_the_checkpoint(mlflow_store, tmp_path):
    classes = ["apple", "dog", "car"]
    clf, path = _tiny_classifier(tmp_path, classes)
    with tracking.stage_run("evaluate") as tracker:
        version = tracking.register_classifier(tracker, path, "clipshift-test", tags={"a": "b"})
    assert version == "1"
    model = mlflow.pyfunc.load_model("models:/clipshift-test@champion")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 16, 16, 3), dtype=np.uint8)
    probs = model.predict(images)
    assert list(probs.columns) == classes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected = torch.softmax(predict_logits(clf, torch.from_numpy(images).permute(0, 3, 1, 2)), -1)
    np.testing.assert_allclose(probs.to_numpy(), expected.numpy(), atol=1e-5)
    # encoded image bytes work too (what a REST client would send)
    encoded = []
    for array in images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    from_bytes = model.predict(pd.DataFrame({"image": encoded}))
    np.testing.assert_allclose(from_bytes.to_numpy(), probs.to_numpy(), atol=1e-5)
