"""Evaluating a pretrained CLIP on its own: zero-shot top-1, linear probe, retrieval recall@k.

What the scaling study measures at every grid point (Cherti et al. 2023 report zero-shot
classification, linear probing and retrieval recall@5), and what ``evaluate`` uses for the
pretrained models' retrieval.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clipshift.classifier import (
    ImageClassifier,
    extract_features,
    module_device,
    to_model_input,
    visual_image_size,
)
from clipshift.data.loaders import LabelledData
from clipshift.errors import DataError
from clipshift.methods import bootstrap
from clipshift.methods.linear_probe import train_linear_probe
from clipshift.methods.metrics import recall_at_k, top1
from clipshift.methods.zeroshot import zeroshot_classifier
from clipshift.models import ClipBundle, ClipModel

FEATURE_BATCH = 256


@dataclass
class ClipEvalData:
    """A task (class names, train and test splits) and held-out image–caption pairs."""

    classes: list[str]
    train: LabelledData
    test: LabelledData
    retrieval_images: torch.Tensor  # uint8 N×3×H×W, resized to the model by retrieval_recall
    retrieval_captions: list[str]
    #: Shift sets over the task's whole label space, scored with the same zero-shot head.
    shifts: dict[str, LabelledData] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Identifies the evaluation samples (which keys survived the exclusions)."""
        parts = [*self.train.keys, "|", *self.test.keys, "|", *self.retrieval_captions]
        for name in sorted(self.shifts):  # no shifts: the fingerprint of earlier versions
            parts += ["|", name, *self.shifts[name].keys]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalProtocol:
    """How a CLIP is scored: its zero-shot head's prompt templates and the linear-probe
    settings (the finetune section's, so the scaling grid and the study agree)."""

    templates: tuple[str, ...]
    probe_steps: int
    probe_lr: float
    probe_weight_decay: float


@torch.inference_mode()
def retrieval_recall(
    model: ClipModel,
    tokenizer: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor,
    captions: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Recall@k of a CLIP on image–caption pairs (uint8 images, one caption each)."""
    if len(images) != len(captions):
        raise DataError(f"{len(images)} images but {len(captions)} captions; pair them 1:1")
    model.eval()
    device = device or module_device(model)
    size = visual_image_size(model.visual)
    img, txt = [], []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], size).to(device)
        img.append(model.encode_image(batch).float().cpu())
        tokens = tokenizer(list(captions[start : start + batch_size])).to(device)
        txt.append(model.encode_text(tokens).float().cpu())
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    return recall_at_k(torch.cat(img), torch.cat(txt), ks, ids[:, None] == ids[None, :])


def mean_retrieval_recalls(
    bundle: ClipBundle, data: ClipEvalData, device: torch.device, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k on the retrieval pairs, each the mean of image→text and text→image."""
    recall = retrieval_recall(
        bundle.model, bundle.tokenizer, data.retrieval_images, data.retrieval_captions,
        ks=ks, batch_size=FEATURE_BATCH, device=device,
    )  # fmt: skip
    return {
        f"retrieval_recall_{k}": 0.5 * (recall[f"image_to_text@{k}"] + recall[f"text_to_image@{k}"])
        for k in ks
    }


def evaluate_clip(
    bundle: ClipBundle,
    data: ClipEvalData,
    protocol: EvalProtocol,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Zero-shot top-1, linear-probe top-1 (train → test) and retrieval recalls of a CLIP;
    ``zeroshot_per_class`` ``{"correct", "total"}`` (per-class test counts, what a class-level
    bootstrap resamples); with shift sets, ``zeroshot_shift_accuracy`` ``{shift: top-1}`` too."""
    device = device or module_device(bundle.model)
    zs = zeroshot_classifier(bundle, data.classes, protocol.templates)
    # One feature pass per split serves both the zero-shot head and the probe.
    f_train = extract_features(zs.visual, data.train.images, FEATURE_BATCH, None, device)
    f_test = extract_features(zs.visual, data.test.images, FEATURE_BATCH, None, device)
    with torch.inference_mode():
        zs_logits = zs.head(zs.prepare(f_test.to(device))).cpu()
    head, _ = train_linear_probe(
        f_train,
        data.train.labels,
        num_classes=len(data.classes),
        weight_decays=(protocol.probe_weight_decay,),
        steps=protocol.probe_steps,
        lr=protocol.probe_lr,
        seed=seed,
    )
    with torch.inference_mode():
        probe_logits = head(F.normalize(f_test.float(), dim=-1))
    out: dict = {
        "zeroshot_accuracy": top1(zs_logits, data.test.labels),
        "zeroshot_per_class": _per_class(zs_logits, data.test.labels, len(data.classes)),
        "linear_probe_accuracy": top1(probe_logits, data.test.labels),
        **mean_retrieval_recalls(bundle, data, device),
    }
    if data.shifts:
        out["zeroshot_shift_accuracy"] = {
            name: _zeroshot_top1(zs, shift, device) for name, shift in sorted(data.shifts.items())
        }
    return out


def _per_class(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    preds = {"model": {"test": logits.argmax(dim=-1).cpu().numpy()}}
    truth = {"test": torch.as_tensor(labels).cpu().numpy()}
    counts = bootstrap.from_predictions(preds, truth, num_classes)
    return {"correct": counts.correct[0, 0].tolist(), "total": counts.total[0].tolist()}


def _zeroshot_top1(zs: ImageClassifier, data: LabelledData, device: torch.device) -> float:
    features = extract_features(zs.visual, data.images, FEATURE_BATCH, None, device)
    with torch.inference_mode():
        logits = zs.head(zs.prepare(features.to(device))).cpu()
    return top1(logits, data.labels)
