"""Linear probe (CLIP's protocol, Radford et al. 2021, §3.2): an L2-regularised logistic
regression on frozen, L2-normalised features; the regularisation strength is chosen on the
validation split from a small log-spaced grid. Like the wise-ft code's linear classifier, the
head starts from the zero-shot head when one is given (``init``), so the probe and the zero-shot
head are two points of one optimisation path, which the linear WiSE-FT curve interpolates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    steps: int,
    lr: float,
    seed: int,
    init: nn.Linear | None = None,
) -> nn.Linear:
    """Full-batch Adam on mean cross-entropy + l2/2 · ||W||² (bias unpenalised), from ``init``'s
    weights (copied, never modified) or from zeros."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        if init is None:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        else:
            if tuple(init.weight.shape) != (num_classes, x.shape[1]):
                raise ValueError(
                    f"init head has shape {tuple(init.weight.shape)}, the probe needs "
                    f"{(num_classes, x.shape[1])} (classes × feature dim)"
                )
            head.weight.copy_(init.weight.detach())
            head.bias.copy_(init.bias.detach() if init.bias is not None else 0.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.requires_grad_(False)


def train_linear_probe(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_val: torch.Tensor | None = None,
    labels_val: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = (1e-4,),
    steps: int = 200,
    lr: float = 1e-2,
    normalize: bool = True,
    seed: int = 0,
    init: nn.Linear | None = None,
) -> tuple[nn.Linear, dict[str, Any]]:
    """A logistic-regression head on (L2-normalised) features, started from ``init`` (the
    zero-shot head, as in the wise-ft code) or from zeros.

    The L2 strength is chosen from ``weight_decays`` by validation accuracy (ties → the
    stronger regulariser, the simpler model), as CLIP's linear-probe protocol sweeps its C on a
    held-out split. The final head is the one trained with that strength on the train split
    only: refitting on train+val would leak val, which later chooses WiSE-FT's α.
    Returns ``(head, {"weight_decay", "val_accuracy": {wd: acc}})``.
    """
    num_classes = num_classes or int(labels_train.max()) + 1
    prep = (lambda f: F.normalize(f.float(), dim=-1)) if normalize else (lambda f: f.float())
    x, y = prep(features_train), torch.as_tensor(labels_train, dtype=torch.long)
    grid = sorted(set(float(w) for w in weight_decays))
    if len(grid) == 1 or features_val is None:
        wd = grid[-1]
        head = _fit_logistic(x, y, num_classes, wd, steps, lr, seed, init)
        return head, {"weight_decay": wd, "val_accuracy": {}}
    xv, yv = prep(features_val), torch.as_tensor(labels_val, dtype=torch.long)
    scores: dict[float, float] = {}
    heads: dict[float, nn.Linear] = {}
    for wd in grid:
        heads[wd] = _fit_logistic(x, y, num_classes, wd, steps, lr, seed, init)
        scores[wd] = float((heads[wd](xv).argmax(1) == yv).float().mean())
    best = max(grid, key=lambda w: (scores[w], w))
    return heads[best], {
        "weight_decay": best,
        "val_accuracy": {str(k): v for k, v in scores.items()},
    }
