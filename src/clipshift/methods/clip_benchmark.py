"""Evaluate's results as CLIP_benchmark result files, so they merge with its tables.

CLIP_benchmark (LAION-AI/CLIP_benchmark) writes one JSON file per (model, dataset, task):
``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, and its ``build``
command merges a set of them into one CSV, a row per file (the metrics flattened beside the
other keys, ``model_fullname`` = ``model + ' ' + pretrained``). Here:

- ``model`` is the open_clip architecture of the model's vision tower (``ViT-B-32``, a
  repository config name) and ``pretrained`` is clipshift's model id (``zeroshot-diverse``,
  ``wiseft-diverse-a0.50``, …): each evaluated model is its own set of weights;
- ``task`` is ``zeroshot_classification`` for zero-shot heads (metrics ``acc1``, ``acc5``,
  ``mean_per_class_recall``, as CLIP_benchmark computes them), ``zeroshot_retrieval`` for the
  pretrained CLIPs on the retrieval pairs (``image_retrieval_recall@k``: text→image,
  ``text_retrieval_recall@k``: image→text), and ``classification`` for every model trained on
  the task (fine-tunes, WiSE-FT, probes, baselines): the same metrics, under a task name
  CLIP_benchmark does not use, since none of its protocols trains on the reference set and
  scores the shifts;
- ``acc5`` is null where fewer than 5 classes are scored (CLIP_benchmark writes NaN), and a
  set scored over a class subset (ImageNet-R/-A) ranks only those classes, as for top-1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic
from clipshift.methods.bootstrap import PerClassCounts

SUBDIR = "clip_benchmark"  # under evaluate.out_dir
LANGUAGE = "en"
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
# clipshift's retrieval keys -> CLIP_benchmark's: its "image retrieval" ranks images per text
RETRIEVAL_KEYS = {
    "text_to_image": "image_retrieval_recall",
    "image_to_text": "text_retrieval_recall",
}


@dataclass(frozen=True)
class Result:
    """One CLIP_benchmark result file."""

    dataset: str
    model: str
    pretrained: str
    task: str
    metrics: dict[str, float | None]

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "pretrained": self.pretrained,
            "task": self.task,
            "metrics": self.metrics,
            "language": LANGUAGE,
        }

    def file_name(self) -> str:
        """CLIP_benchmark's default output template, ``{dataset}_{pretrained}_{model}_
        {language}_{task}.json``, with characters unsafe in file names replaced."""
        parts = (self.dataset, self.pretrained, self.model, LANGUAGE, self.task)
        return "_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p) for p in parts) + ".json"


def classification_task(kind: str) -> str:
    return "zeroshot_classification" if kind == "zeroshot" else "classification"


def mean_per_class_recall(counts: PerClassCounts, model: str, dataset: str) -> float:
    """Mean over the classes the set has of the fraction of their examples predicted right
    (scikit-learn's balanced accuracy, which CLIP_benchmark reports)."""
    m, d = counts.models.index(model), counts.datasets.index(dataset)
    total = counts.total[d]
    present = total > 0
    return float(np.mean(counts.correct[m, d, present] / total[present]))


def classification_results(
    acc1: Mapping[str, Mapping[str, float]],
    acc5: Mapping[str, Mapping[str, float | None]],
    counts: PerClassCounts,
    archs: Mapping[str, str],
    kinds: Mapping[str, str],
) -> list[Result]:
    """One result per (model, dataset) of evaluate's accuracies."""
    out = []
    for model, by_set in sorted(acc1.items()):
        for dataset, top1 in sorted(by_set.items()):
            metrics = {
                "acc1": top1,
                "acc5": acc5.get(model, {}).get(dataset),
                "mean_per_class_recall": mean_per_class_recall(counts, model, dataset),
            }
            task = classification_task(kinds[model])
            out.append(Result(dataset, archs[model], model, task, metrics))
    return out


def retrieval_results(
    recalls: Mapping[str, Mapping[str, float]], archs: Mapping[str, str], dataset: str
) -> list[Result]:
    """One result per pretrained CLIP (``{pool: {'image_to_text@k': r, …}}``)."""
    out = []
    for pool, rec in sorted(recalls.items()):
        metrics: dict[str, float | None] = {}
        for key, value in sorted(rec.items()):
            direction, k = key.split("@")
            metrics[f"{RETRIEVAL_KEYS[direction]}@{k}"] = value
        out.append(Result(dataset, archs[pool], f"pretrain-{pool}", "zeroshot_retrieval", metrics))
    return out


def write_results(folder: str | Path, results: list[Result]) -> list[Path]:
    """Write every result as its own file in ``folder``, replacing what an earlier run left."""
    folder = Path(folder)
    names = [r.file_name() for r in results]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"CLIP_benchmark result files would collide: {twice[:3]}")
    for stale in folder.glob("*.json"):
        stale.unlink()
    return [write_json_atomic(folder / n, r.as_json()) for n, r in zip(names, results, strict=True)]
