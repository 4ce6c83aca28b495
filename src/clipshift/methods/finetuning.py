"""End-to-end supervised fine-tuning of an image classifier (WiSE-FT's "standard
fine-tuning", Wortsman et al. 2022): start from the given classifier (the zero-shot one, or a
fresh tower for the baselines) and train the whole vision tower and the head with
cross-entropy, AdamW and a warmup + cosine schedule; single process or DDP under torchrun.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipshift import distributed as D
from clipshift.classifier import (
    ImageClassifier,
    default_device,
    to_model_input,
    visual_image_size,
)
from clipshift.errors import DataError
from clipshift.methods.metrics import accuracy
from clipshift.progress import progress_bar
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.train_utils import cosine_lr


def augment(
    images: torch.Tensor, generator: torch.Generator, strength: float = 1.0
) -> torch.Tensor:
    """Random zoom-crop, shift and brightness/contrast jitter of a uint8 batch, batched.

    No flips: many emoji are not mirror-symmetric in meaning (arrows, hands, text), so a flip
    can change the class. At ``strength`` 1: zoom 0.75–1 with the crop anywhere inside the
    image ≈ torchvision's RandomResizedCrop with a mild scale range; ±6 % extra shift
    (border-padded); brightness and contrast ×0.8–1.2. ``strength`` scales every range
    (0 = identity ranges), so soup ingredients can differ in augmentation, as in Wortsman et
    al.'s soups; the same random numbers are drawn whatever the strength.
    """
    n = images.shape[0]
    x = images.float() / 255.0

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    scale = uniform(1 - 0.25 * strength, 1.0)
    tx = (1 - scale) * uniform(-1, 1) + uniform(-0.06 * strength, 0.06 * strength)
    ty = (1 - scale) * uniform(-1, 1) + uniform(-0.06 * strength, 0.06 * strength)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(1 - 0.2 * strength, 1 + 0.2 * strength).view(n, 1, 1, 1)
    contrast = uniform(1 - 0.2 * strength, 1 + 0.2 * strength).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def finetune_end_to_end(
    clf: ImageClassifier,
    train,
    val=None,
    *,
    epochs: int,
    lr: float,
    head_lr_scale: float = 1.0,
    batch_size: int = 64,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    grad_clip_norm: float | None = 1.0,
    augment_strength: float = 1.0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    tracker: Tracker | None = None,
    log_prefix: str = "finetune",
    progress: bool = False,
    device: str | torch.device | None = None,
) -> ImageClassifier:
    """Train every parameter of ``clf`` (tower + head) on ``train`` with cross-entropy.

    AdamW + linear warmup (``warmup_fraction`` of the steps) + cosine decay; the head learns at
    ``lr * head_lr_scale`` (a head far from the task's, like a weak zero-shot head, must move
    fast or the tower distorts its features to fit it). Batches are shuffled
    by a generator seeded with ``seed`` (so a run is reproducible on one device). Logs
    ``<log_prefix>/loss`` per step and ``<log_prefix>/val_accuracy`` per epoch. Returns
    ``clf`` (trained in place, in eval mode).

    Under torchrun (an initialised process group) the model is wrapped in DDP and every rank
    draws the same global batch (same generator) and takes its slice of it: ``batch_size``
    stays the global batch, and the gradient is that of the global-batch mean loss.
    """
    tracker = tracker or NullTracker()
    device = torch.device(device) if device is not None else default_device()
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    n = len(labels)
    if n == 0:
        raise DataError("the train split is empty; check data/fetch/train and the exclude lists")
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    clf.to(device).train()
    model = _ddp(clf, device)
    size = visual_image_size(clf.visual)
    head = list(clf.head.parameters())
    tower = [p for p in clf.parameters() if all(p is not h for h in head)]
    groups = [{"params": tower, "lr": lr}, {"params": head, "lr": lr * head_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, 1.0, warmup, total)
    )
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(total, progress and D.is_main(), log_prefix)
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = train.images[idx]
            if augment_strength > 0:  # the whole global batch: same draws as one process
                batch = augment(batch, gen, augment_strength)
            mine, weight = _rank_slice(len(idx))
            logits = model(to_model_input(batch[mine], size).to(device))
            # sum over my rows / global rows, times world (DDP averages gradients over ranks):
            # the gradient of the global-batch mean, whatever the split
            targets = labels[idx][mine].to(device)
            part = F.cross_entropy(
                logits, targets, reduction="sum", label_smoothing=label_smoothing
            )
            loss = part * weight / len(idx)
            optimizer.zero_grad(set_to_none=True)
            (loss * D.get_world_size()).backward()
            if grad_clip_norm:
                nn.utils.clip_grad_norm_(clf.parameters(), grad_clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
            if step % 10 == 0 or step == total:
                global_loss = float(D.all_reduce_mean(loss.detach())) * D.get_world_size()
                tracker.log_metrics({f"{log_prefix}/loss": global_loss}, step=step)
        if val is not None and D.is_main():
            acc = accuracy(clf, val, 256, device)
            tracker.log_metrics({f"{log_prefix}/val_accuracy": acc}, step=step)
            clf.train()
    if bar is not None:
        bar.close()
    return clf.eval()


def _ddp(clf: nn.Module, device: torch.device) -> nn.Module:
    """``clf`` wrapped in DDP under torchrun (gradients all-reduced), itself otherwise."""
    if D.get_world_size() == 1:
        return clf
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(clf, device_ids=ids, broadcast_buffers=False)


def _rank_slice(rows: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of ``rows`` and the weight of its loss.

    A rank left with no rows (a last batch smaller than the world) still runs one row with
    weight 0, so that every rank takes part in DDP's gradient all-reduce.
    """
    world, rank = D.get_world_size(), D.get_rank()
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    return (slice(lo, hi), 1.0) if hi > lo else (slice(0, 1), 0.0)
