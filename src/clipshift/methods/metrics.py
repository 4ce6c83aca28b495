"""Scores of predictions: top-1 accuracy, the class-subset argmax and top-k, retrieval recall@k.

One implementation of each, used by every stage (an accuracy computed two ways is two numbers
that can disagree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipshift.classifier import ImageClassifier, predict_logits, to_model_input
from clipshift.errors import DataError


def top1(scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
    """Fraction of rows whose highest score is the label."""
    labels = torch.as_tensor(labels, device=scores.device)
    return float((scores.argmax(dim=1) == labels).float().mean())


def accuracy(
    clf: ImageClassifier, data, batch_size: int = 256, device: str | torch.device | None = None
) -> float:
    """Top-1 accuracy (fraction) of ``clf`` on a LabelledData."""
    return top1(predict_logits(clf, data.images, batch_size, to_model_input, device), data.labels)


def masked_argmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 class per row, among the classes ``mask`` keeps (all of them without a mask)."""
    return _masked(scores, mask).argmax(dim=1)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``scores`` with the classes outside ``mask`` at -inf."""
    if mask is None:
        return scores
    if mask.shape[0] != scores.shape[1]:
        raise DataError(
            f"a class-subset mask over {mask.shape[0]} classes does not fit a model with "
            f"{scores.shape[1]} classes; evaluate models of the task the dataset was mapped "
            "onto (fetch.sources class_map targets) or re-run fetch"
        )
    return scores.masked_fill(~mask.to(scores.device), float("-inf"))


def masked_topk_hits(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, k: int = 5
) -> torch.Tensor | None:
    """Per row, whether the label is among the ``k`` best classes ``mask`` keeps; None when
    fewer than ``k`` classes are kept (top-k would be trivially right, CLIP_benchmark's NaN)."""
    kept = scores.shape[1] if mask is None else int(mask.sum())
    if kept < k:
        return None
    top = _masked(scores, mask).topk(k, dim=1).indices
    return (top == torch.as_tensor(labels, device=top.device)[:, None]).any(dim=1)


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    positives: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image→text and text→image recall@k for paired embeddings (row i ↔ row i).

    ``positives[i, j]`` marks text j as a correct match for image i (default: the diagonal).
    Marking identical captions as positives is fair when several images share a caption:
    their text embeddings are identical, so which one ranks first is an arbitrary tie.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    sims = img @ txt.T
    n = sims.shape[0]
    pos = positives if positives is not None else torch.eye(n, dtype=torch.bool)
    out = {}
    for k in ks:
        kk = min(int(k), n)
        i2t = pos.gather(1, sims.topk(kk, dim=1).indices).any(dim=1)
        t2i = pos.T.gather(1, sims.T.topk(kk, dim=1).indices).any(dim=1)
        out[f"image_to_text@{k}"] = float(i2t.float().mean())
        out[f"text_to_image@{k}"] = float(t2i.float().mean())
    return out
