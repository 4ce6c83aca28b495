"""Weight-space ensembles: WiSE-FT (Wortsman et al., CVPR 2022) and model soups (Wortsman et
al., ICML 2022).

WiSE-FT mixes the zero-shot and the fine-tuned classifier parameter by parameter,
θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned, vision tower and head alike; the zero-shot head
(prompt-ensemble class embeddings · logit scale) is the α = 0 head. This only makes sense
between models with the same keys and shapes, so mismatches are refused, not broadcast.

The *linear-classifier* variant keeps the pretrained tower frozen and mixes only the heads
(zero-shot head vs. linear probe); features are computed once and every α is a cheap matrix
product, so an 11-point sweep costs about one evaluation pass.

Soups average several fine-tuned models: *uniform* averages all of them; *greedy* visits them
in order of validation accuracy and keeps one only if the soup's validation accuracy does not
drop. α and soup membership are chosen on the reference VAL split only, never on the shifts
(choosing on a shift would report tuned, not effective, robustness).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from clipshift.classifier import (
    ImageClassifier,
    make_head,
)
from clipshift.errors import CheckpointError
from clipshift.methods.metrics import accuracy, top1

StateDict = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# state-dict arithmetic


def check_compatible(
    theta_0: StateDict, theta_1: StateDict, names: tuple[str, str] = ("θ0", "θ1")
) -> None:
    """Raise CheckpointError listing every key/shape/dtype difference between two state dicts."""
    only_0 = sorted(set(theta_0) - set(theta_1))
    only_1 = sorted(set(theta_1) - set(theta_0))
    shapes = [
        f"{k}: {tuple(theta_0[k].shape)} vs {tuple(theta_1[k].shape)}"
        for k in theta_0
        if k in theta_1 and theta_0[k].shape != theta_1[k].shape
    ]
    dtypes = [
        f"{k}: {theta_0[k].dtype} vs {theta_1[k].dtype}"
        for k in theta_0
        if k in theta_1 and theta_0[k].dtype != theta_1[k].dtype
    ]
    problems = []
    if only_0:
        problems.append(f"keys only in {names[0]}: {_clip_list(only_0)}")
    if only_1:
        problems.append(f"keys only in {names[1]}: {_clip_list(only_1)}")
    if shapes:
        problems.append(f"shapes differ: {_clip_list(shapes)}")
    if dtypes:
        problems.append(f"dtypes differ: {_clip_list(dtypes)}")
    if problems:
        raise CheckpointError(
            "cannot average weights of different architectures — "
            + "; ".join(problems)
            + ". Interpolate only models fine-tuned from the same pretrained checkpoint "
            "(same model config and number of classes)"
        )


def _clip_list(items: list[str], limit: int = 8) -> str:
    more = f" … (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def interpolate_state_dicts(
    theta_0: StateDict, theta_1: StateDict, wise_alpha: float
) -> dict[str, torch.Tensor]:
    """(1 − α)·θ0 + α·θ1 for every float tensor; non-float buffers are copied from θ0.

    α = 0 and α = 1 return clones of the endpoints, bit for bit (the formula would round:
    (1 − 1)·x + 1·y is y, but 0·inf or 0·nan is nan, and an endpoint must be exactly itself).
    """
    if not 0.0 <= wise_alpha <= 1.0:
        raise ValueError(f"wise_alpha must lie in [0, 1], got {wise_alpha}")
    check_compatible(theta_0, theta_1)
    if wise_alpha == 0.0:
        return {k: v.detach().clone() for k, v in theta_0.items()}
    if wise_alpha == 1.0:
        return {k: v.detach().clone() for k, v in theta_1.items()}
    out = {}
    for key, v0 in theta_0.items():
        v0 = v0.detach()
        if v0.is_floating_point() or v0.is_complex():
            out[key] = (1.0 - wise_alpha) * v0 + wise_alpha * theta_1[key].detach()
        else:
            out[key] = v0.clone()
    return out


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The mean of several compatible state dicts (non-float buffers from the first)."""
    if not state_dicts:
        raise ValueError("a soup needs at least one model")
    first = state_dicts[0]
    for i, other in enumerate(state_dicts[1:], start=1):
        check_compatible(first, other, ("model 0", f"model {i}"))
    out = {}
    for key, v0 in first.items():
        if v0.is_floating_point():
            total = torch.zeros_like(v0, dtype=torch.float64)
            for sd in state_dicts:
                total += sd[key].detach().to(torch.float64)
            out[key] = (total / len(state_dicts)).to(v0.dtype)
        else:
            out[key] = v0.detach().clone()
    return out


M = TypeVar("M", bound=nn.Module)


def with_state(template: M, state: StateDict) -> M:
    """A copy of ``template`` holding ``state``."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# sweeps and soups


@dataclass
class SweepPoint:
    wise_alpha: float
    val_accuracy: float
    model: nn.Module  # the interpolated ImageClassifier (end-to-end) or head (linear)


def wiseft_model(
    zeroshot: ImageClassifier, finetuned: ImageClassifier, wise_alpha: float
) -> ImageClassifier:
    if zeroshot.normalize_features != finetuned.normalize_features:
        raise CheckpointError(
            "zero-shot and fine-tuned classifiers differ in feature normalisation"
        )
    return with_state(
        zeroshot, interpolate_state_dicts(zeroshot.state_dict(), finetuned.state_dict(), wise_alpha)
    )


def wiseft_sweep(
    zeroshot_clf: ImageClassifier,
    finetuned_clf: ImageClassifier,
    alphas: Sequence[float],
    val,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> list[SweepPoint]:
    """End-to-end WiSE-FT: every parameter of tower and head mixed; val accuracy per α."""
    points = []
    for wise_alpha in alphas:
        model = wiseft_model(zeroshot_clf, finetuned_clf, float(wise_alpha))
        points.append(
            SweepPoint(float(wise_alpha), accuracy(model, val, batch_size, device), model.cpu())
        )
    return points


def linear_wiseft_sweep(
    features: torch.Tensor,
    labels: torch.Tensor,
    zs_head: nn.Linear,
    probe_head: nn.Linear,
    alphas: Sequence[float],
    normalize: bool = True,
) -> list[SweepPoint]:
    """Linear-classifier WiSE-FT: mix the heads only, on raw tower ``features`` computed once."""
    x = F.normalize(features.float(), dim=-1) if normalize else features.float()
    y = torch.as_tensor(labels, dtype=torch.long)
    points = []
    for wise_alpha in alphas:
        state = interpolate_state_dicts(
            zs_head.state_dict(), probe_head.state_dict(), float(wise_alpha)
        )
        head = make_head(state["weight"], state["bias"])
        with torch.no_grad():
            acc = top1(head(x), y)
        points.append(SweepPoint(float(wise_alpha), acc, head))
    return points


def choose_wise_alpha(results: Sequence[Any]) -> float:
    """The α with the highest validation accuracy; ties go to the smaller α.

    Smaller α is closer to the zero-shot model, whose robustness WiSE-FT wants to keep, so
    between equally accurate (on val) mixtures the more conservative one is preferred.
    ``results``: SweepPoints or dicts with ``wise_alpha`` and ``val_accuracy``.
    """
    if not results:
        raise ValueError("no sweep results to choose α from")

    def get(r: Any, key: str) -> float:
        return float(r[key] if isinstance(r, Mapping) else getattr(r, key))

    best = min(results, key=lambda r: (-get(r, "val_accuracy"), get(r, "wise_alpha")))
    return get(best, "wise_alpha")


@dataclass
class GreedySoup:
    """A greedy soup and how it was made (indices refer to the ``models`` given)."""

    state: dict[str, torch.Tensor]
    members: list[int]  # sorted
    val_accuracy: float
    singles: list[float]  # val accuracy of each model alone
    steps: list[dict[str, Any]]  # visit order: {"index", "val_accuracy" (with it), "accepted"}


def greedy_soup(
    models: Sequence[ImageClassifier],
    val,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> GreedySoup:
    """Greedy soup (Wortsman et al. 2022, Recipe 1): visit models by decreasing val accuracy,
    starting from the best; add each to the soup if the soup's val accuracy does not drop.

    The soup is never worse on val than the best single model (it starts as that model and
    only accepts non-decreasing steps).
    """
    if not models:
        raise ValueError("a soup needs at least one model")
    singles = [accuracy(m, val, batch_size, device) for m in models]
    order = sorted(range(len(models)), key=lambda i: (-singles[i], i))
    members = [order[0]]
    best = singles[order[0]]
    steps: list[dict[str, Any]] = [{"index": order[0], "val_accuracy": best, "accepted": True}]
    states = [m.state_dict() for m in models]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in members + [i]])
        acc = accuracy(with_state(models[0], candidate), val, batch_size, device)
        steps.append({"index": i, "val_accuracy": acc, "accepted": acc >= best})
        if acc >= best:
            members.append(i)
            best = acc
    state = uniform_soup([states[j] for j in members])
    return GreedySoup(state, sorted(members), best, singles, steps)
