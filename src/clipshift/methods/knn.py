"""k-NN classification on frozen features (DINO's evaluation, Caron et al. 2021,
``eval_knn.py``): cosine similarity to the training features, the k nearest vote with weight
exp(similarity / T), T = 0.07. A k-NN "model" is its training features and labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipshift.checkpoints import load_checkpoint, save_checkpoint
from clipshift.errors import CheckpointError

KNN_FORMAT = "clipshift-knn-v1"


KNN_TEMPERATURE = 0.07  # DINO's default; sharper than 1, softer than a hard majority vote


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 10,
    num_classes: int | None = None,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class probabilities ``[N_test, classes]`` of a weighted k-NN on cosine similarity.

    As in DINO's ``eval_knn.py``: the k most similar training features vote for their label
    with weight exp(cos / T); votes are normalised to sum to 1 per test example.
    """
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    device = test_feats.device
    bank = F.normalize(train_feats.float().to(device), dim=-1)
    train_labels = train_labels.to(device)
    out = []
    for start in range(0, len(test_feats), chunk):
        queries = F.normalize(test_feats[start : start + chunk].float(), dim=-1)
        sims, idx = (queries @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes, device=device)
    return torch.cat(out)


def save_knn(
    path: str | Path, train_feats: torch.Tensor, train_labels: torch.Tensor, meta: dict
) -> Path:
    """k-NN "model" = training features + labels; ``meta['visual_checkpoint']`` names the
    classifier file (same directory) whose vision tower computes the features."""
    state = {
        "format": KNN_FORMAT,
        "train_features": train_feats.float().cpu().contiguous(),
        "train_labels": torch.as_tensor(train_labels, dtype=torch.long).cpu(),
        "meta": meta,
    }
    save_checkpoint(path, state)
    return Path(path)


def load_knn(path: str | Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    if state.get("format") != KNN_FORMAT:
        raise CheckpointError(f"'{path}' is not a clipshift k-NN file; re-run the finetune stage")
    return state
