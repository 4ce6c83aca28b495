"""Image classifiers built on open_clip vision towers, and their checkpoint files.

An :class:`ImageClassifier` is an open_clip vision tower, optionally followed by feature
L2-normalisation, followed by a linear head. It covers every classifier of the study:

- zero-shot: CLIP's visual tower, normalised features, head = logit_scale · text class
  embeddings, bias 0 — its logits equal CLIP's zero-shot logits exactly;
- end-to-end fine-tuned: the same module after training (WiSE-FT fine-tunes tower + head);
- linear probe: the frozen pretrained tower with a trained head;
- WiSE-FT / soups: any of the above with averaged weights (same keys, same shapes);
- baselines: a fresh tower + head trained from scratch (no normalisation, like a standard
  supervised network).

Checkpoints hold ``{"format", "state_dict", "meta"}`` where ``meta`` is plain JSON-like data
(model name, architecture config, class names, kind, …), so they load with
``torch.load(weights_only=True)`` and the tower can be rebuilt without any code object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower  # pinned open_clip 3.3.0: the tower factory
from torch import nn

from clipshift.checkpoints import load_checkpoint, save_checkpoint
from clipshift.data.loaders import normalize
from clipshift.errors import CheckpointError

FORMAT = "clipshift-classifier-v1"


def build_visual(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip vision tower for a CLIP architecture config."""
    return _build_vision_tower(
        config["embed_dim"], config["vision_cfg"], quick_gelu=config.get("quick_gelu", False)
    )


def config_image_size(config: dict[str, Any]) -> int:
    size = config["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


class ImageClassifier(nn.Module):
    """vision tower → (L2-normalise) → Linear. Input: normalised float images."""

    def __init__(self, visual: nn.Module, head: nn.Linear, normalize_features: bool = True):
        super().__init__()
        self.visual = visual
        self.head = head
        self.normalize_features = normalize_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.prepare(self.visual(images))

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """What the head sees, from raw tower outputs (lets callers cache tower outputs)."""
        return F.normalize(features, dim=-1) if self.normalize_features else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @property
    def num_classes(self) -> int:
        return self.head.out_features


def make_head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear layer holding ``weight`` ([classes, dim]) and ``bias`` (zeros if None)."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    return head


def clip_classifier(clip_model: Any, class_embeddings: torch.Tensor) -> ImageClassifier:
    """``clip_model``: an open_clip CLIP (see :data:`clipshift.models.ClipModel`)."""
    """Zero-shot classifier: a copy of CLIP's tower, head = logit_scale · class embeddings.

    Scaling the head by CLIP's learned temperature (as WiSE-FT does) gives calibrated logits,
    and keeps the zero-shot head on the scale fine-tuning starts from.
    """
    scale = (
        float(clip_model.logit_scale.detach().exp()) if hasattr(clip_model, "logit_scale") else 1.0
    )
    visual = copy.deepcopy(clip_model.visual)
    return ImageClassifier(visual, make_head(scale * class_embeddings.float()), True)


# --------------------------------------------------------------------------------------------
# checkpoints


def classifier_state(clf: ImageClassifier, meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict. ``meta`` needs ``model_config`` (the CLIP config whose vision tower
    ``clf.visual`` is); ``normalize_features`` and ``num_classes`` are filled in here."""
    if "model_config" not in meta:
        raise CheckpointError("classifier meta needs 'model_config' to rebuild the vision tower")
    meta = {**meta, "normalize_features": clf.normalize_features, "num_classes": clf.num_classes}
    state_dict = {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()}
    return {"format": FORMAT, "state_dict": state_dict, "meta": meta}


def save_classifier(path: str | Path, clf: ImageClassifier, meta: dict[str, Any]) -> Path:
    save_checkpoint(path, classifier_state(clf, meta))
    return Path(path)


def classifier_from_state(state: dict[str, Any], where: str = "state") -> ImageClassifier:
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} is not a clipshift classifier (format {state.get('format')!r}, expected "
            f"{FORMAT!r}); re-run the finetune/interpolate stage that writes it"
        )
    meta = state["meta"]
    config = meta["model_config"]
    head = nn.Linear(int(config["embed_dim"]), int(meta["num_classes"]))
    clf = ImageClassifier(build_visual(config), head, bool(meta["normalize_features"]))
    try:
        clf.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where} does not match its own architecture config ({str(exc).splitlines()[0]}); "
            "it was written by a different clipshift/open_clip version — re-run its stage"
        ) from None
    return clf.eval()


def load_classifier(path: str | Path) -> tuple[ImageClassifier, dict[str, Any]]:
    state = load_checkpoint(path)
    return classifier_from_state(state, f"checkpoint '{path}'"), dict(state["meta"])


# --------------------------------------------------------------------------------------------
# features


def to_model_input(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 images → normalised float input at ``size`` (open_clip's mean/std, via loaders)."""
    return normalize(images, size=size)


def visual_image_size(visual: nn.Module) -> int | None:
    size = getattr(visual, "image_size", None)
    if size is None:
        return None
    return int(size if isinstance(size, int) else size[0])


@torch.inference_mode()
def extract_features(
    visual: nn.Module,
    images_uint8: torch.Tensor,
    batch_size: int = 256,
    normalize_fn: Callable[..., torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Raw tower outputs ``[N, embed_dim]`` (float32, CPU) for uint8 images ``[N, 3, H, W]``.

    Images are normalised (and resized to the tower's input size) batch by batch, so a large
    evaluation set never exists as float32 in memory all at once.
    """
    normalize_fn = normalize_fn or to_model_input
    device = device or module_device(visual)
    size = visual_image_size(visual)
    was_training = visual.training
    visual.eval()
    out = []
    for start in range(0, len(images_uint8), batch_size):
        batch = normalize_fn(images_uint8[start : start + batch_size], size).to(device)
        out.append(visual(batch).float().cpu())
    visual.train(was_training)
    if not out:
        return torch.zeros(0, getattr(visual, "output_dim", 0))
    return torch.cat(out)


@torch.inference_mode()
def predict_logits(
    clf: ImageClassifier,
    images_uint8: torch.Tensor,
    batch_size: int = 256,
    normalize_fn: Callable[..., torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Logits ``[N, classes]`` (CPU) of a classifier on uint8 images."""
    feats = extract_features(clf.visual, images_uint8, batch_size, normalize_fn, device)
    was_training = clf.training
    clf.eval()
    logits = clf.head(clf.prepare(feats.to(module_device(clf.head)))).float().cpu()
    clf.train(was_training)
    return logits


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (CPU for a parameterless module)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
