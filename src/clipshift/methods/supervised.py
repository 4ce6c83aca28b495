"""Fang et al. (2022)'s control (a): CLIP's image tower trained as a plain supervised classifier.

The question is whether CLIP's effective robustness comes from language supervision or from
its training images. The control keeps the images and the compute and drops the language: the
same image tower, initialised as pretraining initialises it, sees the same number of pool
images (same batches, optimiser, LR schedule and precision) and learns to name each image's
emoji with cross-entropy, through a linear head over every emoji of the pool. The text tower
is skipped, so the control spends CLIP's image-tower compute only.

To be scored on the reference task, the head is then cut to the task's classes
(:func:`restrict_head`): the classifier predicts among them only, as the zero-shot head does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from clipshift import train_utils as T
from clipshift.classifier import ImageClassifier, make_head, module_device
from clipshift.config import PretrainConfig
from clipshift.progress import bar_position

# The logit of a task class the pool never shows: no image taught the head that class, so it
# must never win (it stays finite so that softmaxes and sums of logits stay finite).
UNSEEN_LOGIT = -1e9


class Batches(Protocol):
    """Global batch ``step`` as micro-batches of (uint8-derived float images, int64 labels)."""

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def supervised_classifier(visual: nn.Module, embed_dim: int, num_classes: int) -> ImageClassifier:
    """The tower with a fresh linear head over ``num_classes`` pool classes (initialised from
    the global RNG, which the caller seeds). Features are not L2-normalised: a standard
    supervised network, like the reference-only baselines."""
    return ImageClassifier(visual, nn.Linear(embed_dim, num_classes), normalize_features=False)


def restrict_head(
    head: nn.Linear, pool_classes: Sequence[str], task_classes: Sequence[str]
) -> tuple[nn.Linear, list[str]]:
    """The head's rows for ``task_classes``, in the task's order, and the task classes the pool
    lacks. Classes are named by the same ids on both sides (emoji codepoints); a task class
    absent from the pool gets a zero row with bias :data:`UNSEEN_LOGIT`, so it is never
    predicted."""
    row_of = {name: i for i, name in enumerate(pool_classes)}
    missing = [name for name in task_classes if name not in row_of]
    weight = torch.zeros(len(task_classes), head.in_features)
    bias = torch.full((len(task_classes),), UNSEEN_LOGIT)
    with torch.no_grad():
        for j, name in enumerate(task_classes):
            if name in row_of:
                weight[j] = head.weight[row_of[name]].detach().float().cpu()
                bias[j] = float(head.bias[row_of[name]])
    return make_head(weight, bias), missing


def task_classifier(
    clf: ImageClassifier, pool_classes: Sequence[str], task_classes: Sequence[str]
) -> tuple[ImageClassifier, list[str]]:
    """``clf`` (a pool-class classifier) as a classifier over ``task_classes`` (same tower)."""
    head, missing = restrict_head(clf.head, pool_classes, task_classes)
    head = head.to(module_device(clf.visual))
    return ImageClassifier(clf.visual, head, clf.normalize_features), missing


def train_cross_entropy(
    clf: ImageClassifier,
    batches: Batches,
    cfg: PretrainConfig,
    device: torch.device,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: bool = False,
    desc: str = "supervised",
) -> dict[str, Any]:
    """Train ``clf`` with cross-entropy for ``cfg.samples // cfg.batch_size`` steps of
    ``cfg.batch_size`` images, with the pretrain section's optimiser (AdamW, its parameter
    groups), warmup + cosine LR, gradient clipping, accumulation and precision.

    Returns ``{"history": [...], "train_time_s": float, "steps": int}``; ``history`` holds one
    record per ``cfg.log_every`` steps and the last (``step``, ``samples``, ``loss``,
    ``loss_avg``, ``lr``, ``grad_norm``), each also passed to ``on_log``. Raises
    TrainingDiverged on a non-finite loss.
    """
    total = cfg.samples // cfg.batch_size
    clf.to(device).train()
    optimizer = T.build_optimizer(clf, cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps)
    scaler = T.make_scaler(cfg.precision, device)
    history: list[dict[str, float]] = []
    interval: list[float] = []
    train_time = 0.0
    bar = tqdm(
        total=total, desc=desc, disable=not progress, dynamic_ncols=True, position=bar_position()
    )
    for step in range(total):
        start = time.perf_counter()
        lr = T.cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
        T.set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss = _forward_backward(clf, batches.micro_batches(step), cfg, device, scaler)
        scaler.unscale_(optimizer)
        norm = float(T.grad_norm(clf.parameters(), cfg.grad_clip_norm))
        if not math.isfinite(loss):
            raise T.TrainingDiverged(
                f"{desc}: the cross-entropy went non-finite at step {step}; lower pretrain.lr "
                "or raise warmup_steps, or use precision fp32, then re-run"
            )
        scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
        scaler.update()
        train_time += time.perf_counter() - start
        interval.append(loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            record = {
                "step": done,
                "samples": done * cfg.batch_size,
                "loss": loss,
                "loss_avg": sum(interval) / len(interval),
                "lr": lr,
                "grad_norm": norm,
            }
            history.append(record)
            interval = []
            if on_log is not None:
                on_log(record)
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
    bar.close()
    clf.eval()
    return {"history": history, "train_time_s": train_time, "steps": total}


def _forward_backward(
    clf: ImageClassifier,
    micro: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: PretrainConfig,
    device: torch.device,
    scaler: torch.amp.GradScaler,
) -> float:
    """Gradient of the global batch's mean cross-entropy (micro-batches are equal in size, so
    the mean of their means is the batch mean); returns that loss."""
    total = 0.0
    for images, labels in micro:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with T.autocast(cfg.precision, device):
            logits = clf(images)
        loss = F.cross_entropy(logits.float(), labels) / len(micro)
        scaler.scale(loss).backward()
        total += float(loss.detach())
    return total
