"""The interpolate stage: WiSE-FT sweeps and model soups over the finetune stage's models.

For each pool, the end-to-end WiSE-FT curve (zero-shot ↔ each fine-tune, every parameter
mixed) and the linear-classifier curve (zero-shot head ↔ linear probe on the frozen tower), α
chosen on the reference VAL split only; then the uniform and greedy soups of the fine-tunes.
The maths is :mod:`clipshift.methods.wiseft`. Writes the models, ``index.json`` and
``interpolate.json`` under ``cfg.out_dir``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

from clipshift.classifier import (
    ImageClassifier,
    default_device,
    extract_features,
    load_classifier,
    save_classifier,
)
from clipshift.config import MIN_SOUP, PAPER_WISE_ALPHA, InterpolateConfig
from clipshift.data.loaders import load_labelled
from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic
from clipshift.methods.metrics import accuracy
from clipshift.methods.wiseft import (
    SweepPoint,
    choose_wise_alpha,
    greedy_soup,
    linear_wiseft_sweep,
    uniform_soup,
    wiseft_sweep,
    with_state,
)
from clipshift.registry import INDEX_FILE, ModelEntry, read_index, write_index
from clipshift.tracking_api import NullTracker, Tracker

# --------------------------------------------------------------------------------------------
# the stage


def _pick(entries: list[ModelEntry], kind: str, pool: str | None = None) -> list[ModelEntry]:
    return [e for e in entries if e.kind == kind and (pool is None or e.pool == pool)]


def _alpha_tag(wise_alpha: float) -> str:
    return f"a{wise_alpha:g}"


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
    """Save every α's model (for heads, on ``visual``); returns the JSON record of the sweep:
    val accuracy per α, the α chosen on val and WiSE-FT's fixed α = 0.5, each with its val
    accuracy."""
    chosen = choose_wise_alpha(points)
    val_of = {p.wise_alpha: p.val_accuracy for p in points}
    if PAPER_WISE_ALPHA not in val_of:  # the config demands it; a hand-made call might not
        raise ValueError(f"the sweep lacks α = {PAPER_WISE_ALPHA}, WiSE-FT's fixed mixing weight")
    for step, p in enumerate(points):
        # end-to-end points are whole classifiers; linear points are heads on ``visual``
        clf = (
            cast(ImageClassifier, p.model)
            if visual is None
            else ImageClassifier(visual, cast(nn.Linear, p.model), True)
        )
        extra = {
            "variant": variant,
            "val_accuracy": p.val_accuracy,
            "chosen": p.wise_alpha == chosen,
            "paper_alpha": p.wise_alpha == PAPER_WISE_ALPHA,
            "finetuned": source,
        }
        run.save(
            f"{prefix}-{_alpha_tag(p.wise_alpha)}",
            clf,
            {"kind": "wiseft", "wise_alpha": p.wise_alpha, "extra": extra},
            kind="wiseft",
            wise_alpha=p.wise_alpha,
            variant=variant,
        )
        run.tracker.log_metrics({f"{prefix}/val_accuracy": p.val_accuracy}, step=step)
    run.tracker.log_metrics(
        {
            f"{prefix}/chosen_wise_alpha": chosen,
            f"{prefix}/chosen_val_accuracy": val_of[chosen],
            f"{prefix}/paper_val_accuracy": val_of[PAPER_WISE_ALPHA],
        }
    )
    return {
        "val_accuracy": {f"{p.wise_alpha:g}": p.val_accuracy for p in points},
        "chosen_wise_alpha": chosen,
        "chosen_val_accuracy": val_of[chosen],
        "paper_wise_alpha": PAPER_WISE_ALPHA,
        "paper_val_accuracy": val_of[PAPER_WISE_ALPHA],
        "source": source,
    }


def _soups(run: _Run, finetuned: list[ModelEntry]) -> dict[str, Any]:
    """The uniform and/or greedy soups of the pool's fine-tunes (at least MIN_SOUP of them).

    Records each ingredient's val accuracy and, for the greedy soup, the visit order (by val
    accuracy) with the val accuracy of the soup with each candidate and whether it was kept.
    """
    if not run.cfg.soups:
        return {}
    if len(finetuned) < MIN_SOUP:
        raise DataError(
            f"soups {run.cfg.soups} need at least {MIN_SOUP} fine-tuned models of pool "
            f"'{run.pool}', the finetune stage wrote {len(finetuned)}; list at least "
            f"{MIN_SOUP - 1} finetune.soup_ingredients, or set interpolate.soups: []"
        )
    models = [load_classifier(e.path)[0] for e in finetuned]
    ids = [e.id for e in finetuned]
    out: dict[str, Any] = {}
    for recipe in run.cfg.soups:
        t0 = time.perf_counter()
        if recipe == "uniform":
            members = list(range(len(models)))
            soup = with_state(models[0], uniform_soup([m.state_dict() for m in models]))
            acc = accuracy(soup, run.val, run.cfg.batch_size)
            record: dict[str, Any] = {}
        else:
            greedy = greedy_soup(models, run.val, run.cfg.batch_size)
            members, acc = greedy.members, greedy.val_accuracy
            soup = with_state(models[0], greedy.state)
            record = {
                "ingredients_val_accuracy": dict(zip(ids, greedy.singles, strict=True)),
                "steps": [
                    {"ingredient": ids[step["index"]], **{k: step[k] for k in step if k != "index"}}
                    for step in greedy.steps
                ],
            }
        extra = {"recipe": recipe, "members": [ids[i] for i in members], "val_accuracy": acc}
        name = f"soup-{recipe}-{run.pool}"
        run.save(
            name,
            soup,
            {"kind": "soup", "extra": extra},
            kind="soup",
            recipe=recipe,
            members=extra["members"],
        )
        out[recipe] = {**extra, **record, "seconds": round(time.perf_counter() - t0, 2)}
        run.tracker.log_metrics({f"soup/{recipe}/val_accuracy": acc})
    return out


def run_interpolate(cfg: InterpolateConfig, tracker: Tracker | None = None) -> dict[str, Any]:
    """WiSE-FT sweeps (end-to-end and linear) and soups for the pool of the main fine-tuned
    model; writes models, index.json and interpolate.json under ``cfg.out_dir``; returns the
    interpolate.json content."""
    index_path = Path(cfg.finetune_dir) / INDEX_FILE
    if not index_path.exists():
        raise DataError(f"no {index_path}; run `dvc repro finetune` first")
    entries = read_index(index_path)
    finetuned = _pick(entries, "finetuned")
    if not finetuned:
        raise DataError(f"{index_path} lists no fine-tuned model; run the finetune stage")
    main = next((e for e in finetuned if e.extra.get("main")), finetuned[0])
    pool = main.pool
    if pool is None:
        raise DataError(
            f"{index_path}: fine-tuned model '{main.id}' names no pool; re-run finetune"
        )
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
    write_json_atomic(out / "interpolate.json", without_timings(summary))
    run.tracker.log_dict(summary, "interpolate.json")
    return summary


def without_timings(summary: Any) -> Any:
    """``summary`` without its ``seconds`` entries: ``cfg.out_dir`` is a DVC output, so it holds
    no timing; they stay in the returned summary (metrics/interpolate.json and MLflow)."""
    if isinstance(summary, dict):
        return {k: without_timings(v) for k, v in summary.items() if k != "seconds"}
    return summary
