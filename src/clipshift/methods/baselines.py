"""The "standard" models: trained from scratch on the reference task only.

In the ImageNet testbed (Taori et al. 2020; Miller et al. 2021) models trained on the reference
distribution alone, whatever their architecture or training budget, lie on one line in the
(logit ID accuracy, logit shift accuracy) plane; effective robustness is measured against that
line. Here each :class:`~clipshift.config.BaselineSpec` gives one such model: a fresh open_clip
vision tower (the same family as the CLIP models) of the given width/depth plus a linear head,
trained with cross-entropy for ``epochs`` on a seeded, class-stratified ``fraction`` of the
reference train split. Varying size, epochs and data spreads the models along the line.

They must stay cheap (they run on every ``dvc repro``): the towers use 8-px patches (a 32-px
image is 16 tokens) and an MLP ratio of 2. On a CPU the stage trains them side by side, one
core each (:mod:`clipshift.parallel`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clipshift.classifier import ImageClassifier, build_visual, default_device
from clipshift.config import BaselineSpec
from clipshift.errors import DataError
from clipshift.methods.finetuning import finetune_end_to_end
from clipshift.methods.metrics import accuracy
from clipshift.models import tiny_vit_config, tiny_vit_name
from clipshift.parallel import Run, run_side_by_side
from clipshift.tracking_api import NullTracker, Tracker

PATCH_SIZE = 8  # 16 tokens at 32 px: ~4x cheaper than 4-px patches, still a ViT
MLP_RATIO = 2.0  # half the usual MLP: ~25-35 % cheaper; the line is architecture-agnostic
LR = 1e-3
WEIGHT_DECAY = 0.05
BATCH_SIZE = 128


@dataclass
class TrainedModel:
    id: str
    clf: ImageClassifier
    meta: dict[str, Any]
    val_accuracy: float | None = None
    seconds: float = 0.0


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded subset holding ``fraction`` of every class (at least one each)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if fraction >= 1.0:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        take = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    return torch.cat(keep).sort().values


def baseline_config(spec: BaselineSpec, image_size: int) -> dict[str, Any]:
    config = tiny_vit_config(spec.width, spec.layers, image_size=image_size, patch_size=PATCH_SIZE)
    config["vision_cfg"]["mlp_ratio"] = MLP_RATIO
    return config


def train_baselines(
    specs: Sequence[BaselineSpec],
    train,
    val=None,
    image_size: int = 32,
    seed: int = 0,
    tracker: Tracker | None = None,
    device: str | torch.device | None = None,
    workers: int = 1,
) -> list[TrainedModel]:
    """Train one from-scratch classifier per spec (ids ``baseline-00``, ``baseline-01``, …),
    ``workers`` of them side by side (:mod:`clipshift.parallel`; each is seeded by its index,
    so the worker that trains it does not matter)."""
    if len(train.classes) < 2:
        raise DataError("the train split has fewer than 2 classes; baselines need a task")
    common = {"train": train, "val": val, "image_size": image_size, "seed": seed}
    runs = [
        Run(
            train_baseline,
            {**common, "index": i, "spec": spec, "device": device},
            tracker,
            cost=spec.epochs * spec.fraction * spec.layers * spec.width**2,
        )
        for i, spec in enumerate(specs)
    ]
    return run_side_by_side(runs, workers)


def train_baseline(
    index: int,
    spec: BaselineSpec,
    train,
    val=None,
    image_size: int = 32,
    seed: int = 0,
    tracker: Tracker | None = None,
    device: str | torch.device | None = None,
) -> TrainedModel:
    """Baseline ``index`` of the stage: ``spec``'s tower and a linear head, trained from
    scratch on a stratified ``spec.fraction`` of ``train``."""
    tracker = tracker or NullTracker()
    device = device or default_device()
    t0 = time.perf_counter()
    model_seed = seed * 1000 + index  # distinct, reproducible init and order per spec
    torch.manual_seed(model_seed)
    config = baseline_config(spec, image_size)
    clf = ImageClassifier(
        build_visual(config), torch.nn.Linear(config["embed_dim"], len(train.classes)), False
    )
    subset = train.subset(stratified_subset(train.labels, spec.fraction, model_seed))
    model_id = f"baseline-{index:02d}"
    finetune_end_to_end(
        clf,
        subset,
        None,
        epochs=spec.epochs,
        lr=LR,
        batch_size=BATCH_SIZE,
        weight_decay=WEIGHT_DECAY,
        seed=model_seed,
        tracker=tracker,
        log_prefix=f"baselines/{model_id}",
        device=device,
    )
    val_acc = accuracy(clf, val, 256, device) if val is not None else None
    meta = {
        "model_name": tiny_vit_name(spec.width, spec.layers, image_size, PATCH_SIZE),
        "model_config": config,
        "kind": "baseline",
        "pool": None,
        "spec": spec.model_dump(),
        "train_samples": len(subset.labels),
        "seed": model_seed,
    }
    if val_acc is not None:
        tracker.log_metrics({f"baselines/{model_id}/val_accuracy": val_acc})
    return TrainedModel(model_id, clf.cpu(), meta, val_acc, time.perf_counter() - t0)
