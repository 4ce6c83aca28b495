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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipshift.classifier import (
    ImageClassifier,
    default_device,
    extract_features,
    load_classifier,
    make_head,
    save_classifier,
)
from clipshift.config import InterpolateConfig
from clipshift.errors import CheckpointError, DataError
from clipshift.finetune import accuracy_of
from clipshift.io_utils import write_json_atomic
from clipshift.registry import INDEX_FILE, ModelEntry, read_index, write_index
from clipshift.tracking_api import NullTracker, Tracker

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
    theta_0: StateDict, theta_1: StateDict, alpha: float
) -> dict[str, torch.Tensor]:
    """(1 − α)·θ0 + α·θ1 for every float tensor; non-float buffers are copied from θ0.

    α = 0 and α = 1 return clones of the endpoints, bit for bit (the formula would round:
    (1 − 1)·x + 1·y is y, but 0·inf or 0·nan is nan, and an endpoint must be exactly itself).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    check_compatible(theta_0, theta_1)
    if alpha == 0.0:
        return {k: v.detach().clone() for k, v in theta_0.items()}
    if alpha == 1.0:
        return {k: v.detach().clone() for k, v in theta_1.items()}
    out = {}
    for key, v0 in theta_0.items():
        v0 = v0.detach()
        if v0.is_floating_point() or v0.is_complex():
            out[key] = (1.0 - alpha) * v0 + alpha * theta_1[key].detach()
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


def with_state(template: nn.Module, state: StateDict) -> nn.Module:
    """A copy of ``template`` holding ``state``."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# sweeps and soups


@dataclass
class SweepPoint:
    alpha: float
    val_accuracy: float
    model: nn.Module  # the interpolated ImageClassifier (end-to-end) or head (linear)


def wiseft_model(
    zeroshot: ImageClassifier, finetuned: ImageClassifier, alpha: float
) -> ImageClassifier:
    if zeroshot.normalize_features != finetuned.normalize_features:
        raise CheckpointError(
            "zero-shot and fine-tuned classifiers differ in feature normalisation"
        )
    return with_state(
        zeroshot, interpolate_state_dicts(zeroshot.state_dict(), finetuned.state_dict(), alpha)
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
    for alpha in alphas:
        model = wiseft_model(zeroshot_clf, finetuned_clf, float(alpha))
        points.append(
            SweepPoint(float(alpha), accuracy_of(model, val, batch_size, device), model.cpu())
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
    for alpha in alphas:
        state = interpolate_state_dicts(zs_head.state_dict(), probe_head.state_dict(), float(alpha))
        head = make_head(state["weight"], state["bias"])
        with torch.no_grad():
            acc = float((head(x).argmax(1) == y).float().mean())
        points.append(SweepPoint(float(alpha), acc, head))
    return points


def choose_alpha(results: Sequence[Any]) -> float:
    """The α with the highest validation accuracy; ties go to the smaller α.

    Smaller α is closer to the zero-shot model, whose robustness WiSE-FT wants to keep, so
    between equally accurate (on val) mixtures the more conservative one is preferred.
    ``results``: SweepPoints or dicts with ``alpha`` and ``val_accuracy``.
    """
    if not results:
        raise ValueError("no sweep results to choose α from")

    def get(r: Any, key: str) -> float:
        return float(r[key] if isinstance(r, Mapping) else getattr(r, key))

    best = min(results, key=lambda r: (-get(r, "val_accuracy"), get(r, "alpha")))
    return get(best, "alpha")


def greedy_soup(
    models: Sequence[ImageClassifier],
    val,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], list[int], float]:
    """Greedy soup (Wortsman et al. 2022, Recipe 1): visit models by decreasing val accuracy,
    starting from the best; add each to the soup if the soup's val accuracy does not drop.

    Returns ``(state_dict, member indices into models, soup val accuracy)``. The soup is never
    worse on val than the best single model (it starts as that model and only accepts
    non-decreasing steps).
    """
    if not models:
        raise ValueError("a soup needs at least one model")
    singles = [accuracy_of(m, val, batch_size, device) for m in models]
    order = sorted(range(len(models)), key=lambda i: (-singles[i], i))
    members = [order[0]]
    best = singles[order[0]]
    states = [m.state_dict() for m in models]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in members + [i]])
        acc = accuracy_of(with_state(models[0], candidate), val, batch_size, device)
        if acc >= best:
            members.append(i)
            best = acc
    return uniform_soup([states[j] for j in members]), sorted(members), best


# --------------------------------------------------------------------------------------------
# the stage


def _pick(entries: list[ModelEntry], kind: str, pool: str | None = None) -> list[ModelEntry]:
    return [e for e in entries if e.kind == kind and (pool is None or e.pool == pool)]


def _alpha_tag(alpha: float) -> str:
    return f"a{alpha:g}"


@dataclass
class _Run:
    """What the steps of the interpolate stage share."""

    cfg: InterpolateConfig
    out: Path
    pool: str
    val: Any
    meta: dict[str, Any]
    tracker: Tracker
    entries: list[ModelEntry]

    def save(self, name: str, clf: ImageClassifier, entry: dict[str, Any], **meta: Any) -> None:
        save_classifier(self.out / f"{name}.pt", clf, {**self.meta, **meta})
        self.entries.append(ModelEntry(id=name, pool=self.pool, path=f"{name}.pt", **entry))


def _save_sweep(
    run: _Run,
    prefix: str,
    variant: str,
    points: list[SweepPoint],
    source: str,
    visual: nn.Module | None = None,
) -> dict[str, Any]:
    """Save every α's model (for heads, on ``visual``); returns the JSON record of the sweep."""
    chosen = choose_alpha(points)
    for step, p in enumerate(points):
        clf = p.model if visual is None else ImageClassifier(visual, p.model, True)
        extra = {
            "variant": variant,
            "val_accuracy": p.val_accuracy,
            "chosen": p.alpha == chosen,
            "finetuned": source,
        }
        run.save(
            f"{prefix}-{_alpha_tag(p.alpha)}",
            clf,
            {"kind": "wiseft", "alpha": p.alpha, "extra": extra},
            kind="wiseft",
            alpha=p.alpha,
            variant=variant,
        )
        run.tracker.log_metrics({f"{prefix}/val_accuracy": p.val_accuracy}, step=step)
    run.tracker.log_metrics({f"{prefix}/chosen_alpha": chosen})
    return {
        "val_accuracy": {f"{p.alpha:g}": p.val_accuracy for p in points},
        "chosen_alpha": chosen,
        "source": source,
    }


def _soups(run: _Run, finetuned: list[ModelEntry]) -> dict[str, Any]:
    """Uniform and/or greedy soups of the pool's fine-tuned models (needs at least 2)."""
    if not run.cfg.soups:
        return {}
    if len(finetuned) < 2:
        return {"skipped": "fewer than 2 fine-tuned models (list more finetune.soup_lrs)"}
    models = [load_classifier(e.path)[0] for e in finetuned]
    out = {}
    for recipe in run.cfg.soups:
        t0 = time.perf_counter()
        if recipe == "uniform":
            members = list(range(len(models)))
            soup = with_state(models[0], uniform_soup([m.state_dict() for m in models]))
            acc = accuracy_of(soup, run.val, run.cfg.batch_size)
        else:
            state, members, acc = greedy_soup(models, run.val, run.cfg.batch_size)
            soup = with_state(models[0], state)
        ids = [finetuned[i].id for i in members]
        name = f"soup-{recipe}-{run.pool}"
        extra = {"recipe": recipe, "members": ids, "val_accuracy": acc}
        run.save(
            name, soup, {"kind": "soup", "extra": extra}, kind="soup", recipe=recipe, members=ids
        )
        out[recipe] = {**extra, "seconds": round(time.perf_counter() - t0, 2)}
        run.tracker.log_metrics({f"soup/{recipe}/val_accuracy": acc})
    return out


def run_interpolate(cfg: InterpolateConfig, tracker: Tracker | None = None) -> dict[str, Any]:
    """WiSE-FT sweeps (end-to-end and linear) and soups for the pool of the main fine-tuned
    model; writes models, index.json and interpolate.json under ``cfg.out_dir``; returns the
    interpolate.json content."""
    from clipshift.data.loaders import load_labelled

    index_path = Path(cfg.finetune_dir) / INDEX_FILE
    if not index_path.exists():
        raise DataError(f"no {index_path}; run `dvc repro finetune` first")
    entries = read_index(index_path)
    finetuned = _pick(entries, "finetuned")
    if not finetuned:
        raise DataError(f"{index_path} lists no fine-tuned model; run the finetune stage")
    main = next((e for e in finetuned if e.extra.get("main")), finetuned[0])
    pool = main.pool
    zs_entries = _pick(entries, "zeroshot", pool)
    if not zs_entries:
        raise DataError(f"{index_path} has no zero-shot model for pool '{pool}'; re-run finetune")
    val = load_labelled(Path(cfg.data_dir) / "val")
    zs, zs_meta = load_classifier(zs_entries[0].path)
    if list(zs_meta.get("classnames") or []) not in ([], list(val.classes or [])):
        raise DataError("the zero-shot head's classes differ from the val split's; re-run finetune")
    device = default_device()
    zs = zs.to(device)
    meta = {k: v for k, v in zs_meta.items() if k not in ("normalize_features", "num_classes")}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out, pool, val, meta, tracker or NullTracker(), [])
    summary: dict[str, Any] = {"pool": pool, "alphas": list(cfg.alphas), "selection_split": "val"}

    t0 = time.perf_counter()
    ft = load_classifier(main.path)[0].to(device)
    points = wiseft_sweep(zs, ft, cfg.alphas, val, cfg.batch_size)
    summary["end_to_end"] = _save_sweep(run, f"wiseft-{pool}", "end-to-end", points, main.id)
    summary["end_to_end"]["seconds"] = round(time.perf_counter() - t0, 2)

    linear = _pick(entries, "linear", pool)
    if linear:  # heads only, on val features computed once
        t0 = time.perf_counter()
        probe = load_classifier(linear[0].path)[0]
        feats = extract_features(zs.visual, val.images, cfg.batch_size)
        points = linear_wiseft_sweep(
            feats, val.labels, zs.head.cpu(), probe.head, cfg.alphas, zs.normalize_features
        )
        summary["linear"] = _save_sweep(
            run, f"wiseft-linear-{pool}", "linear", points, linear[0].id, visual=zs.visual
        )
        summary["linear"]["seconds"] = round(time.perf_counter() - t0, 2)

    summary["soups"] = _soups(run, _pick(entries, "finetuned", pool))
    write_index(out, run.entries)
    write_json_atomic(out / "interpolate.json", summary)
    run.tracker.log_dict(summary, "interpolate.json")
    return summary
