"""Top-1 accuracy of every model on every evaluation set, retrieval recall@k, and the stage
that turns them into the effective-robustness metrics and plots.

Feature passes dominate the cost, and many models share a vision tower: the zero-shot
classifier, the linear probe, the k-NN classifier and every linear-WiSE-FT mixture of a pool
all use the same frozen pretrained tower. Models are therefore grouped by a fingerprint of
their tower's weights (sha256 of the tensors), each group's features are computed once per
dataset, and every head of the group is applied to them. Fingerprinting the bytes rather than
trusting file names means a copy of a tower is always recognised, and a changed one never is.
"""

from __future__ import annotations

import csv
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipshift import distributed as D
from clipshift import plots
from clipshift.classifier import (
    ImageClassifier,
    default_device,
    extract_features,
    load_classifier,
)
from clipshift.config import TESTBED, EvaluateConfig
from clipshift.data.loaders import load_captioned, load_labelled, read_exclude
from clipshift.data.shards import load_info
from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic
from clipshift.methods import bootstrap, robustness, testbed
from clipshift.methods import clip_benchmark as cb
from clipshift.methods.clip_eval import retrieval_recall
from clipshift.methods.findings import compute_findings
from clipshift.methods.knn import knn_predict, load_knn
from clipshift.methods.metrics import masked_argmax, masked_topk_hits
from clipshift.models import load_pretrained
from clipshift.progress import progress_bar
from clipshift.registry import ModelEntry, find_pools, read_indices
from clipshift.tracking_api import NullTracker, Tracker

ID_DATASET = "test"
#: The per-class counts file in ``evaluate.out_dir`` (a DVC out: the bootstrap's input).
PER_CLASS_FILE = "per_class.json"
EVAL_ROLES = ("val", "test", "shift")
RETRIEVAL_DATASET = "retrieval"


def visual_fingerprint(visual: nn.Module) -> str:
    """sha256 over the tower's state (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(visual.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class _Scorer:
    """One model reduced to 'raw tower features → class scores', plus where its tower is."""

    entry: ModelEntry
    fingerprint: str
    tower_file: Path
    score: Callable[[torch.Tensor], torch.Tensor]
    arch: str  # the tower's architecture name (CLIP_benchmark's "model")


def _arch(meta: Mapping[str, Any], entry: ModelEntry) -> str:
    return str(meta.get("model_name") or entry.kind)


def _classifier_scorer(entry: ModelEntry) -> tuple[_Scorer, ImageClassifier]:
    clf, meta = load_classifier(entry.path)
    head, prepare = clf.head, clf.prepare

    def score(feats: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(prepare(feats))

    fingerprint = visual_fingerprint(clf.visual)
    return _Scorer(entry, fingerprint, Path(entry.path), score, _arch(meta, entry)), clf


def _knn_scorer(entry: ModelEntry) -> tuple[_Scorer, ImageClassifier]:
    state = load_knn(entry.path)
    meta = state["meta"]
    tower_file = Path(entry.path).parent / meta["visual_checkpoint"]
    clf, tower_meta = load_classifier(tower_file)
    bank, labels = state["train_features"], state["train_labels"]
    k, temperature, classes = int(meta["k"]), float(meta["temperature"]), int(meta["num_classes"])

    def score(feats: torch.Tensor) -> torch.Tensor:
        return knn_predict(bank, labels, feats, k, classes, temperature)

    fingerprint = visual_fingerprint(clf.visual)
    return _Scorer(entry, fingerprint, tower_file, score, _arch(tower_meta, entry)), clf


def _scorer(entry: ModelEntry) -> tuple[_Scorer, ImageClassifier]:
    return _knn_scorer(entry) if entry.kind == "knn" else _classifier_scorer(entry)


def evaluate_models(
    entries: Sequence[ModelEntry],
    datasets: Mapping[str, Any],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats: dict[str, int] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    predictions: dict[str, dict[str, torch.Tensor]] | None = None,
    top5: dict[str, dict[str, float | None]] | None = None,
    archs: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{model_id: {dataset: top-1 accuracy}}`` for every entry on every dataset.

    One feature pass per (distinct tower, dataset). Only one tower is held in memory at a
    time: models are first reduced to their heads and grouped by tower fingerprint, then each
    group's tower is loaded again for its feature passes. ``stats`` (if given) receives
    ``feature_passes`` and ``towers``. ``masks[dataset]`` (bool per class) restricts the
    prediction to a class subset, as ImageNet-R/-A are scored over their 200 classes only.
    ``predictions`` (if given) receives every model's predicted class per example,
    ``{model_id: {dataset: tensor}}`` (the per-class counts of the bootstrap come from them).
    ``top5`` (if given) receives top-5 accuracies (None under 5 scored classes) and
    ``archs`` each model's tower architecture name, for the CLIP_benchmark result files.

    Under torchrun each rank scores its own run of whole batches of every dataset
    (:func:`clipshift.distributed.shard_range`) and the predictions are gathered, so every
    rank returns exactly the accuracies one process computes.
    """
    device = device or default_device()
    masks = masks or {}
    groups: dict[str, list[_Scorer]] = {}
    for entry in entries:
        scorer, _ = _scorer(entry)  # the loaded tower is dropped here; only the head stays
        groups.setdefault(scorer.fingerprint, []).append(scorer)
    results: dict[str, dict[str, float]] = {e.id: {} for e in entries}
    passes = 0
    bar = progress_bar(len(groups) * len(datasets), progress, "evaluate")
    for scorers in groups.values():
        visual = load_classifier(scorers[0].tower_file)[0].visual.to(device)
        for name, data in datasets.items():
            mine = D.shard_range(len(data.labels), batch_size)
            images = data.images[mine.start : mine.stop]
            # Heads are tiny: score on the CPU, where extract_features leaves the features.
            feats = extract_features(visual, images, batch_size, None, device)
            passes += 1
            labels = torch.as_tensor(data.labels)
            mine_labels = labels[mine.start : mine.stop]
            local = {
                s.entry.id: _predict(s.score(feats), masks.get(name), mine_labels) for s in scorers
            }
            parts = D.all_gather_object(local)
            for s in scorers:
                pred = torch.cat([part[s.entry.id][0] for part in parts])
                results[s.entry.id][name] = float((pred == labels).float().mean())
                if predictions is not None:
                    predictions.setdefault(s.entry.id, {})[name] = pred
                if top5 is not None:
                    top5.setdefault(s.entry.id, {})[name] = _top5(
                        part[s.entry.id][1] for part in parts
                    )
            if bar is not None:
                bar.update(1)
        del visual
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update({"feature_passes": passes, "towers": len(groups)})
    if archs is not None:
        archs.update({s.entry.id: s.arch for scorers in groups.values() for s in scorers})
    return results


def _predict(
    scores: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(top-1 class, top-5 hit) per example, both among the classes ``mask`` keeps."""
    return masked_argmax(scores, mask), masked_topk_hits(scores, labels, mask, k=5)


def _top5(hits: Iterable[torch.Tensor | None]) -> float | None:
    """Top-5 accuracy from every rank's hits (None: fewer than 5 classes scored)."""
    parts = list(hits)
    found = [h for h in parts if h is not None]
    if len(found) < len(parts):
        return None
    return float(torch.cat(found).float().mean())


def class_mask(info: Any) -> torch.Tensor | None:
    """Bool per class of a dataset covering part of its label space (``extra.class_subset``,
    written by fetch for class_map sources), or None when it covers every class."""
    subset, classes = info.extra.get("class_subset"), info.classes
    if not subset or not classes:
        return None
    # by index where given: ImageNet has two classes named 'missile' (class_map: imagenet)
    by_index = {c for c in subset if isinstance(c, int)}
    by_name = {c for c in subset if not isinstance(c, int)}
    outside = sorted(c for c in by_index if not 0 <= c < len(classes))
    unknown = [*sorted(by_name - set(classes)), *outside]
    if unknown:
        raise DataError(
            f"dataset '{info.name}' declares class_subset entries {unknown[:5]} that are not "
            "among its classes; fix fetch.sources class_map and run fetch again"
        )
    keep = by_index | {i for i, c in enumerate(classes) if c in by_name}
    if len(keep) == len(classes):
        return None
    return torch.tensor([i in keep for i in range(len(classes))])


# --------------------------------------------------------------------------------------------
# the stage


def eval_dataset_names(data_dir: str | Path) -> dict[str, str]:
    """``{name: role}`` of the labelled evaluation sets (val, test, shifts) in ``data_dir``."""

    found = {}
    for info_file in sorted(Path(data_dir).glob("*/dataset.json")):
        info = load_info(info_file.parent)
        if info.role in EVAL_ROLES:
            found[info_file.parent.name] = info.role
    return found


def _records(entries: Sequence[ModelEntry], acc: Mapping[str, Mapping[str, float]]) -> dict:
    return {
        e.id: {
            "kind": e.kind,
            "pool": e.pool,
            "wise_alpha": e.wise_alpha,
            "variant": e.extra.get("variant"),
            "accuracy": dict(acc[e.id]),
        }
        for e in entries
    }


def shift_groups(data_dir: str | Path, shifts: Sequence[str]) -> dict[str, str]:
    """Each shift's tag from its dataset.json ``extra.shift_group``; an untagged shift is
    ``natural-unseen`` (:data:`~clipshift.methods.robustness.DEFAULT_SHIFT_GROUP`)."""
    return {
        s: load_info(Path(data_dir) / s).extra.get("shift_group", robustness.DEFAULT_SHIFT_GROUP)
        for s in shifts
    }


def per_class_counts(
    predictions: Mapping[str, Mapping[str, torch.Tensor]], datasets: Mapping[str, Any]
) -> bootstrap.PerClassCounts:
    """Correct predictions per class of every model on every eval set (the bootstrap's input)."""
    num_classes = max(
        len(d.classes) if d.classes else int(d.labels.max()) + 1 for d in datasets.values()
    )
    return bootstrap.from_predictions(
        {m: {d: p.numpy() for d, p in by_set.items()} for m, by_set in predictions.items()},
        {name: d.labels.numpy() for name, d in datasets.items()},
        num_classes,
    )


def _plot_view(summary: dict, variants: Mapping[str, str]) -> dict:
    """A copy for plotting where each WiSE-FT variant is its own curve (pool 'p/linear')."""
    models = {}
    for mid, rec in summary["models"].items():
        variant = variants.get(mid)
        if variant and variant != "end-to-end":
            rec = {**rec, "pool": f"{rec.get('pool')}/{variant}"}
        models[mid] = rec
    return {**summary, "models": models}


def write_table(
    path: str | Path, summary: Mapping[str, Any], datasets: Sequence[str], shifts: Sequence[str]
) -> Path:
    """One row per model (the DVC plots table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "model",
        "kind",
        "pool",
        "wise_alpha",
        "variant",
        "id_accuracy",
        "ood_accuracy_avg",
        "effective_robustness_avg",
        *[f"acc_{d}" for d in datasets],
        *[f"er_{s}" for s in shifts],
    ]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for mid, rec in sorted(summary["models"].items()):
            row = {k: rec.get(k) for k in fields}
            row["model"] = mid
            row.update({f"acc_{d}": rec["accuracy"].get(d) for d in datasets})
            row.update({f"er_{s}": rec["effective_robustness"].get(s) for s in shifts})
            writer.writerow(row)
    tmp.replace(path)
    return path


def run_retrieval(
    cfg: EvaluateConfig, device: torch.device, archs: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Recall@k of every pretrained CLIP (``<models_dir>/pretrain/<pool>``) on ``retrieval``;
    ``archs`` (if given) receives each pool's architecture name."""

    data = Path(cfg.data_dir) / RETRIEVAL_DATASET
    pretrain = Path(cfg.models_dir) / "pretrain"
    pools = find_pools(pretrain)
    if not (data / "dataset.json").exists() or not pools:
        return {}
    pairs = load_captioned(data, exclude=read_exclude(cfg.validate_dir, "retrieval"))
    out = {}
    for pool in pools:
        bundle = load_pretrained(pretrain / pool / "checkpoint.pt", device)
        if archs is not None:
            archs[pool] = bundle.name
        out[pool] = retrieval_recall(
            bundle.model,
            bundle.tokenizer,
            pairs.images,
            pairs.captions,
            cfg.retrieval_ks,
            cfg.batch_size,
            device,
        )
    return out


def id_dataset_name(roles: Mapping[str, str]) -> str:
    """The reference test set: the dataset named 'test', else the only one with role 'test'
    (e.g. an ImageNet val set fetched as ``name: imagenet-val, role: test``)."""
    if ID_DATASET in roles:
        return ID_DATASET
    tests = sorted(n for n, r in roles.items() if r == "test")
    if len(tests) != 1:
        raise DataError(
            f"need one reference test set in the evaluation data (a dataset named "
            f"'{ID_DATASET}', or exactly one with role 'test'), found {tests}; run "
            "`dvc repro fetch` or fix the roles in fetch.sources"
        )
    return tests[0]


def load_eval_sets(cfg: EvaluateConfig) -> tuple[dict[str, str], dict[str, Any], dict]:
    """``(roles, datasets, masks)``: every labelled eval set, decoded, minus validate's
    exclusions, and the class-subset mask of each set that covers part of the task."""

    roles = eval_dataset_names(cfg.data_dir)
    datasets, masks = {}, {}
    for name in roles:
        folder = Path(cfg.data_dir) / name
        datasets[name] = load_labelled(folder, read_exclude(cfg.validate_dir, name))
        mask = class_mask(load_info(folder))
        if mask is not None:
            masks[name] = mask
    return roles, datasets, masks


def add_subset_id_sets(
    datasets: dict[str, Any], masks: dict[str, torch.Tensor], id_name: str, shifts: Sequence[str]
) -> list[str]:
    """For each shift scored over a class subset (ImageNet-R, -A, ObjectNet), add the reference
    test set restricted to those classes and scored over them, under
    :func:`~clipshift.methods.robustness.class_subset_id`: the x axis of that shift's line, as
    in the ImageNet testbed. Returns the subset shifts."""
    ref = datasets[id_name]
    subset_shifts = [s for s in shifts if s in masks]
    for shift in subset_shifts:
        keep = masks[shift][ref.labels].nonzero().flatten()
        if keep.numel() == 0:
            raise DataError(
                f"the reference test set '{id_name}' has no image of shift '{shift}''s classes, "
                "so its x axis (ID accuracy on those classes) is undefined; check class_map"
            )
        name = robustness.class_subset_id(id_name, shift)
        datasets[name], masks[name] = ref.subset(keep), masks[shift]
    return subset_shifts


def run_evaluate(
    cfg: EvaluateConfig, tracker: Tracker | None = None, progress: bool = True
) -> dict:
    """The evaluate stage: accuracies → robustness summary (+ retrieval) → metrics, table, plots.

    Under torchrun every rank calls it: the accuracies are computed sharded across ranks
    (see :func:`evaluate_models`); rank 0 alone fits, writes, plots and logs, and every rank
    returns its summary.
    """
    dist = D.init_distributed("auto")
    t0 = time.perf_counter()
    roles, datasets, masks = load_eval_sets(cfg)
    id_name = id_dataset_name(roles)
    class_subsets = {n: int(m.sum()) for n, m in masks.items()}
    add_subset_id_sets(datasets, masks, id_name, [n for n, r in roles.items() if r == "shift"])
    entries = read_indices(cfg.models_dir)
    if not entries:
        raise DataError(f"no models indexed under {cfg.models_dir}/*/index.json; run finetune")
    stats: dict[str, int] = {}
    preds: dict[str, dict[str, torch.Tensor]] = {}
    top5: dict[str, dict[str, float | None]] = {}
    archs: dict[str, str] = {}
    acc = evaluate_models(
        entries, datasets, cfg.batch_size, dist.device, progress and dist.is_main, stats, masks,
        preds, top5, archs,
    )  # fmt: skip
    summary = None
    if dist.is_main:
        counts = per_class_counts(preds, datasets)
        bootstrap.write_counts(Path(cfg.out_dir) / PER_CLASS_FILE, counts)
        pool_archs: dict[str, str] = {}
        summary = _summarise(
            cfg, entries, acc, roles, id_name, datasets, dist.device, counts, pool_archs
        )
        # the datasets themselves: not the subset-class ID sets built for the testbed's x axis
        real = {m: {d: a for d, a in by_set.items() if d in roles} for m, by_set in acc.items()}
        results = cb.classification_results(
            real, top5, counts, archs, {e.id: e.kind for e in entries}
        )
        results += cb.retrieval_results(summary["retrieval"], pool_archs, RETRIEVAL_DATASET)
        cb.write_results(Path(cfg.out_dir) / cb.SUBDIR, results)
        summary["class_subsets"] = class_subsets
        summary["world_size"] = dist.world_size
        summary["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
        summary["feature_passes"] = stats.get("feature_passes", 0)
        _write_outputs(cfg, summary, entries, list(datasets))
        log_summary_metrics(tracker or NullTracker(), summary)  # the flow logs files as artifacts
    return D.broadcast_object(summary)


def _summarise(
    cfg: EvaluateConfig,
    entries: Sequence[ModelEntry],
    acc: Mapping[str, Mapping[str, float]],
    roles: Mapping[str, str],
    id_name: str,
    datasets: Mapping[str, Any],
    device: torch.device,
    counts: bootstrap.PerClassCounts,
    pool_archs: dict[str, str] | None = None,
) -> dict:

    shifts = sorted(n for n, r in roles.items() if r == "shift")
    subset_shifts = [s for s in shifts if robustness.class_subset_id(id_name, s) in datasets]
    baseline_ids = [e.id for e in entries if e.kind == "baseline"]
    external = load_external(cfg, shifts, subset_shifts)
    if external is not None:  # a CSV without a subset shift's ID column: plain ID on that x
        covered = {s for s in subset_shifts if robustness.class_subset_id("id", s) in external}
        subset_shifts = [s for s in subset_shifts if s in covered]
    groups = shift_groups(cfg.data_dir, shifts)
    study = robustness.build_study(
        _records(entries, acc),
        id_name,
        shifts,
        baseline_ids,
        cfg.transform,
        external,
        cfg.external_mode,
        shift_groups=groups,
        num_classes=counts.num_classes,
        min_chance_multiple=cfg.baseline_min_chance_multiple,
        subset_shifts=subset_shifts,
    )
    summary = _robustness_summary(cfg, study, counts, entries)
    if cfg.external_baselines == TESTBED:
        summary["testbed"] = {
            "model_type": testbed.BASELINE_MODEL_TYPE,
            "models": len(external["model"]) if external else 0,
            "shifts": testbed.map_shifts(shifts, cfg.testbed_shifts),
        }
    summary["shift_groups"] = groups
    summary["retrieval"] = run_retrieval(cfg, device, pool_archs)
    summary["id_dataset"], summary["shifts"] = id_name, shifts
    summary["num_examples"] = {name: len(d.labels) for name, d in datasets.items()}
    return summary


def load_external(
    cfg: EvaluateConfig, shifts: Sequence[str], subset_shifts: Sequence[str]
) -> dict[str, list] | None:
    """The external baselines table: the built-in ImageNet testbed, a CSV, or none."""
    if not cfg.external_baselines:
        return None
    if cfg.external_baselines == TESTBED:
        return testbed.load_testbed_baselines(shifts, cfg.testbed_shifts, subset_shifts)
    return robustness.load_external_baselines(cfg.external_baselines, shifts, subset_shifts)


def _robustness_summary(
    cfg: EvaluateConfig,
    study: robustness.Study,
    counts: bootstrap.PerClassCounts,
    entries: Sequence[ModelEntry],
) -> dict:
    """Lines, ERs and findings, each with its class-bootstrap interval."""
    table = study.table()
    point = robustness.analyse(table, study)
    replicates = bootstrap.replicate_table(
        counts, table, study.models, study.datasets, cfg.bootstrap, cfg.bootstrap_seed
    )
    boot = robustness.analyse(replicates, study)
    summary = robustness.study_summary(study, point, boot)
    for e in entries:
        if "variant" in e.extra:
            summary["models"][e.id]["variant"] = e.extra["variant"]
    summary["selected"] = {
        f"wiseft_{e.extra.get('variant', 'end-to-end')}": e.id
        for e in entries
        if e.extra.get("chosen")
    }
    summary["bootstrap"] = {
        "unit": "class",
        "replicates": cfg.bootstrap,
        "seed": cfg.bootstrap_seed,
        "num_classes": counts.num_classes,
        "fixed_models": sorted(set(study.models) - set(counts.models)),
    }
    summary["findings"] = compute_findings(study, point, boot, summary["selected"])
    return summary


def _write_outputs(
    cfg: EvaluateConfig, summary: dict, entries: Sequence[ModelEntry], datasets: list[str]
) -> None:
    """metrics JSON, the plots table and one effective-robustness scatter per shift."""

    shifts = summary["shifts"]
    write_json_atomic(cfg.metrics_path, summary)
    plots_dir = Path(cfg.plots_dir)
    write_table(plots_dir / "table.csv", summary, datasets, shifts)
    scatter_dir = plots_dir / "scatter"  # a DVC image-plots directory, apart from table.csv
    for stale in scatter_dir.glob("effective_robustness_*.png"):  # shifts removed since last run
        stale.unlink()
    variants = {e.id: e.extra["variant"] for e in entries if "variant" in e.extra}
    view = _plot_view(summary, variants)
    for shift in [*shifts, "avg"]:
        path = scatter_dir / f"effective_robustness_{shift}.png"
        plots.plot_effective_robustness(view, shift, path, cfg.transform)
    for group in summary.get("group_fit", {}):
        path = scatter_dir / f"effective_robustness_group-{group}.png"
        plots.plot_effective_robustness(_group_view(view, group), f"group {group}", path)


def _group_view(view: dict, group: str) -> dict:
    """The summary as if shift group ``group``'s mean were one shift named 'group <group>'
    (its line is the group fit), so the scatter draws it like any shift."""
    name = f"group {group}"
    models = {
        mid: {**rec, "accuracy": {**rec["accuracy"], name: rec["ood_accuracy_group"][group]}}
        for mid, rec in view["models"].items()
    }
    return {"models": models, "baseline_fit": {name: view["group_fit"][group]}}


def log_summary_metrics(tracker: Tracker, summary: Mapping[str, Any]) -> None:
    metrics: dict[str, float] = {}
    for mid, rec in summary["models"].items():
        if mid.startswith("external/"):
            continue
        metrics[f"id_accuracy/{mid}"] = rec["id_accuracy"]
        metrics[f"ood_accuracy_avg/{mid}"] = rec["ood_accuracy_avg"]
        metrics[f"effective_robustness_avg/{mid}"] = rec["effective_robustness_avg"]
    for pool, rec in summary.get("retrieval", {}).items():
        metrics.update({f"retrieval/{pool}/{k.replace('@', '_at_')}": v for k, v in rec.items()})
    fit = summary["baseline_fit"].get("avg")
    if fit:
        metrics.update({"baseline_fit/avg/slope": fit["slope"], "baseline_fit/avg/r2": fit["r2"]})
    for fid, entry in summary.get("findings", {}).items():
        metrics[f"findings/{fid}/value"] = entry["value"]
        metrics[f"findings/{fid}/ci95_lo"], metrics[f"findings/{fid}/ci95_hi"] = entry["ci95"]
    tracker.log_metrics(metrics)
