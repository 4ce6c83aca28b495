"""The MLflow pyfunc flavour of a clipshift classifier: images in, class probabilities out.

Registered models (``models:/clipshift-<task>@champion``) load with ``mlflow.pyfunc.load_model``
and take either a uint8 array ``[N, H, W, 3]`` (or ``[N, 3, H, W]``) or a DataFrame with an
``image`` column of encoded image bytes (PNG/JPEG/WebP); they return a DataFrame with one
probability column per class name.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image

from clipshift.classifier import config_image_size, load_classifier, predict_logits
from clipshift.data.loaders import image_to_uint8
from clipshift.errors import DataError


def images_to_uint8(model_input: Any, size: int) -> torch.Tensor:
    """Accept the input shapes documented above; return uint8 ``[N, 3, size, size]``."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise DataError("pass a DataFrame with an 'image' column of encoded image bytes")
        images = [Image.open(io.BytesIO(b)) for b in model_input["image"]]
        return torch.stack([image_to_uint8(im, size) for im in images])
    array = np.asarray(model_input)
    if array.ndim != 4 or array.dtype != np.uint8:
        raise DataError(f"expected uint8 images [N, H, W, 3] or [N, 3, H, W], got {array.shape}")
    tensor = torch.from_numpy(array.copy())
    return tensor if tensor.shape[1] == 3 else tensor.permute(0, 3, 1, 2).contiguous()


class ClassifierModel(PythonModel):
    """Wraps a classifier checkpoint stored as the model's ``classifier`` artifact."""

    def load_context(self, context: Any) -> None:
        self.clf, self.meta = load_classifier(context.artifacts["classifier"])
        self.classes = list(self.meta.get("classnames") or self.meta.get("classes") or [])

    # No type hints here on purpose: MLflow would read them as an (unsupported) input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        size = config_image_size(self.meta["model_config"])
        logits = predict_logits(self.clf, images_to_uint8(model_input, size))
        probs = torch.softmax(logits, dim=-1).numpy()
        columns = self.classes or [str(i) for i in range(probs.shape[1])]
        return pd.DataFrame(probs, columns=columns)


def log_classifier(checkpoint: str | Path, name: str = "model", **logged_model: Any) -> Any:
    """Log the pyfunc model to the active MLflow run as a LoggedModel (``logged_model``: its
    ``params``, ``tags``, ``model_type``); returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("serving_model.py")),  # models from code
        artifacts={"classifier": str(checkpoint)},
        pip_requirements=["clipshift"],
        **logged_model,
    )
