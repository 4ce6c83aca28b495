"""The supervised stage: Fang et al. (2022)'s control (a), one run per pool.

CLIP's image tower, initialised exactly as the pretrain stage initialises its model (seeded
``pretrain.model``), plus a linear head over the pool's emoji, trained with cross-entropy on
the pool's images (label: each sample's ``json`` ``codepoint``) for ``pretrain.samples``
images with pretrain's batch size, optimiser, LR schedule and precision
(:mod:`clipshift.methods.supervised`). The batches are pretrain's own: the same (seed, step)
order and crops of the same decoded pool, so the control sees the very images CLIP sees, in
the same order. "Same compute" is the image tower's: the text tower is skipped (CLIP's run
also pays for its text tower; both FLOP counts are in the metrics).

The head is then cut to the task's classes (matched by codepoint: ``task.codepoints`` of
fetch's manifest) and the result saved as classifier ``supervised-<pool>`` of kind
``supervised``, listed in ``<out_dir>/<pool>/index.json``, where evaluate finds and scores it
like every other classifier. Outputs, in ``<out_dir>/<pool>/``: ``supervised-<pool>.pt``,
``history.json``, ``metrics.json`` (no timings: the folder is a DVC output),
``training_spec.json``, and ``index.json``, written last, so that a run cut off midway never
leaves a model evaluate would pick up. A re-run with an identical training spec reuses the
finished run; any other spec sets earlier work aside (:mod:`clipshift.training_spec`). The run
trains in one go (no resume states: it costs less than CLIP's run, which skips nothing) and in
one process whatever ``pretrain.distributed`` says (the global batch is the same).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from clipshift import distributed as D
from clipshift import train_utils as T
from clipshift.classifier import ImageClassifier, save_classifier
from clipshift.config import PretrainConfig, SupervisedConfig
from clipshift.data.batches import MemoryBatches
from clipshift.data.loaders import LabelledData, PoolTensors, image_to_uint8, load_labelled
from clipshift.data.manifest import read_manifest
from clipshift.data.shards import ReadStats, dataset_fingerprint, iter_dataset, load_info
from clipshift.errors import ConfigError, DataError
from clipshift.flops import clip_flops_per_sample
from clipshift.io_utils import output_lock, read_json, write_json_atomic
from clipshift.methods.metrics import accuracy
from clipshift.methods.supervised import (
    supervised_classifier,
    task_classifier,
    train_cross_entropy,
)
from clipshift.models import ClipBundle, create_clip
from clipshift.registry import INDEX_FILE, ModelEntry, write_index
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.training_spec import canonical, claim_run_dir, fingerprint, section_spec

log = logging.getLogger(__name__)

KIND = "supervised"
LABEL_KEY = "codepoint"  # the emoji id in each pool sample's json
OUTPUT_LAYOUT = 1
TIMING_KEYS = ("samples_per_s", "train_time_s", "wall_time_s")
# pretrain settings the cross-entropy run does not use: they cannot change its weights
UNUSED_PRETRAIN = ("checkpoint_every", "max_rollbacks", "spike_factor", "gather_with_grad",
                   "local_loss", "loader")  # fmt: skip


def model_id(pool: str) -> str:
    return f"{KIND}-{pool}"


def run_path(cfg: SupervisedConfig, pool: str) -> Path:
    return Path(cfg.out_dir) / pool


def pool_path(cfg: SupervisedConfig, pool: str) -> Path:
    return Path(cfg.data_dir) / f"pool-{pool}"


# --------------------------------------------------------------------------------------------
# checks and inputs


def check_run(cfg: SupervisedConfig, pretrain: PretrainConfig, pool: str) -> None:
    """The pool must be listed in both sections; the global batch must split and fit."""
    if pool not in cfg.pools or pool not in pretrain.pools:
        raise ConfigError(
            f"pool '{pool}' is not in supervised.pools {cfg.pools} and pretrain.pools "
            f"{pretrain.pools}: the supervised control matches a CLIP run on the same pool; "
            "add it to both in params.yaml"
        )
    if pretrain.batch_size % pretrain.accum_steps:
        raise ConfigError(
            f"pretrain.batch_size {pretrain.batch_size} does not split into accum_steps "
            f"({pretrain.accum_steps}) equal micro-batches"
        )
    if pretrain.samples < pretrain.batch_size:
        raise ConfigError(
            f"pretrain.samples ({pretrain.samples}) is smaller than one batch "
            f"({pretrain.batch_size}); raise pretrain.samples or lower batch_size"
        )


def load_pool_labels(pool_dir: Path, image_size: int) -> LabelledData:
    """The pool's images (uint8, at the model's size) labelled by emoji: ``classes`` are the
    pool's codepoints, sorted. Rows are the ones the pretrain stage decodes (samples with a
    caption, in shard order), so pretrain's batch indices pick the same images."""
    stats = ReadStats()
    images, codes, keys = [], [], []
    for sample in iter_dataset(pool_dir, stats):
        if sample.get("txt") in (None, ""):
            stats.skip("missing txt")
            continue
        code = (sample.get("json") or {}).get(LABEL_KEY)
        if not code:
            raise DataError(
                f"pool sample {sample['__key__']} of '{pool_dir}' has no '{LABEL_KEY}' in its "
                "json: the supervised control needs each image's emoji id (pools of the "
                "built-in world carry it); drop this pool from supervised.pools"
            )
        images.append(image_to_uint8(sample["image"], image_size))
        codes.append(str(code))
        keys.append(sample["__key__"])
    if not keys:
        raise DataError(f"'{pool_dir}' has no usable samples ({stats.reasons}); re-run fetch")
    classes = sorted(set(codes))
    row = {code: i for i, code in enumerate(classes)}
    labels = torch.tensor([row[c] for c in codes], dtype=torch.long)
    return LabelledData(torch.stack(images), labels, keys, classes, stats)


def task_codepoints(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """The task's (class names, codepoints), in the order of the labelled sets' class indices
    (fetch's manifest ``task``, checked against the val split's classes)."""
    task = read_manifest(data_dir).get("task") or {}
    classes, codes = task.get("classes") or [], task.get("codepoints") or []
    if not codes or len(codes) != len(classes):
        raise DataError(
            f"{Path(data_dir) / 'manifest.json'} lists no task codepoints aligned with its "
            "classes: the supervised control names classes by emoji id; re-run fetch (the "
            "built-in world writes them)"
        )
    val_classes = load_info(Path(data_dir) / "val").classes
    if val_classes is not None and list(val_classes) != list(classes):
        raise DataError(
            f"the val split's classes differ from the manifest's task classes in {data_dir}; "
            "re-run fetch"
        )
    return list(classes), [str(c) for c in codes]


def build_tower(pretrain: PretrainConfig, device: torch.device) -> ClipBundle:
    """``pretrain.model`` created as the pretrain stage creates it from scratch: the same seed
    before the same constructor, so the image tower starts from CLIP's initial weights."""
    start = "init_checkpoint" if pretrain.init_checkpoint is not None else "pretrained"
    if pretrain.init_checkpoint is not None or pretrain.pretrained is not None:
        log.warning(
            "supervised: pretrain.%s is set, but the control trains from scratch (seeded "
            "pretrain.model); compare it with a CLIP trained from scratch",
            start,
        )
    torch.manual_seed(pretrain.seed)
    bundle = create_clip(pretrain.model)
    bundle.model.to(device)
    return bundle


def training_spec(
    cfg: SupervisedConfig, pretrain: PretrainConfig, pool: str, pool_dir: Path, bundle: ClipBundle
) -> dict[str, Any]:
    spec = section_spec("pretrain", pretrain, neutral=UNUSED_PRETRAIN)
    spec.update(section_spec("supervised", cfg))
    spec.update(
        {
            "supervised.pool": pool,
            "supervised.pool_fingerprint": dataset_fingerprint(pool_dir),
            "supervised.task_codepoints": task_codepoints(cfg.data_dir)[1],
            "supervised.architecture": bundle.config,
            "supervised.device": D.resolve_device(pretrain.device).type,
            "supervised.objective": "cross-entropy over the pool's emoji",
            "supervised.output_layout": OUTPUT_LAYOUT,
        }
    )
    return canonical(spec)


# --------------------------------------------------------------------------------------------
# the run


def _finished(out: Path, pool: str, fp: str) -> dict[str, Any] | None:
    """metrics.json of a finished run with this very spec, else None."""
    files = [out / INDEX_FILE, out / f"{model_id(pool)}.pt", out / "metrics.json"]
    if not all(f.exists() for f in files):
        return None
    metrics = read_json(files[2])
    return metrics if metrics.get("training_fingerprint") == fp else None


def _flops(config: dict[str, Any], samples: int) -> dict[str, float]:
    """Training FLOPs (3 × forward) of the image tower alone, and of CLIP on the same samples
    ({} for an architecture the analytic count does not cover)."""
    try:
        per = clip_flops_per_sample(config)
    except (ConfigError, KeyError, AttributeError):
        return {}
    return {
        "image_train_flops": 3.0 * per["image"] * samples,
        "clip_train_flops": 3.0 * per["total"] * samples,
    }


def _write_outputs(
    out: Path, pool: str, clf: ImageClassifier, meta: dict[str, Any], metrics: dict, history: list
) -> None:
    """The model, then the records, then the index that makes evaluate see the model."""
    save_classifier(out / f"{model_id(pool)}.pt", clf, meta)
    write_json_atomic(out / "history.json", history)
    write_json_atomic(out / "metrics.json", metrics)
    entry = ModelEntry(
        id=model_id(pool),
        kind=KIND,
        pool=pool,
        path=f"{model_id(pool)}.pt",
        extra={"val_accuracy": metrics["val_accuracy"], "samples": metrics["samples"]},
    )
    write_index(out, [entry])


def _train(
    cfg: SupervisedConfig,
    pretrain: PretrainConfig,
    pool: str,
    bundle: ClipBundle,
    device: torch.device,
    tracker: Tracker,
    progress: bool,
) -> tuple[ImageClassifier, list[str], dict[str, Any]]:
    """Decode the pool, train the pool-class classifier; (classifier, pool classes, result)."""
    data = load_pool_labels(pool_path(cfg, pool), bundle.image_size)
    embed_dim = int(bundle.config["embed_dim"])
    visual: Any = bundle.model.visual  # open_clip's tower (nn.Module.__getattr__ hides its type)
    clf = supervised_classifier(visual, embed_dim, len(data.classes or []))
    pool_tensors = PoolTensors(data.images, data.labels, data.keys, data.stats)  # labels ride
    # where pretrain's caption tokens go: MemoryBatches only indexes rows, so its (seed, step)
    # order and crops are pretrain's own
    batches = MemoryBatches(pool_tensors, pretrain, D.DistInfo(0, 0, 1, device), bundle.image_size)

    def on_log(record: dict[str, float]) -> None:
        tracker.log_metrics(
            {k: v for k, v in record.items() if k != "step"}, step=int(record["step"])
        )

    result = train_cross_entropy(
        clf, batches, pretrain, device, on_log, progress, desc=f"supervised {pool}"
    )
    result["pool_samples"] = len(data)
    result["samples"] = result["steps"] * pretrain.batch_size
    result["batch_size"] = pretrain.batch_size
    return clf, list(data.classes or []), result


def _evaluate_and_save(
    cfg: SupervisedConfig,
    pool: str,
    bundle: ClipBundle,
    trained: tuple[ImageClassifier, list[str], dict[str, Any]],
    spec: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Cut the head to the task, score it on val, write the outputs; returns metrics.json."""
    clf, pool_classes, result = trained
    task_names, task_codes = task_codepoints(cfg.data_dir)
    task_clf, missing = task_classifier(clf, pool_classes, task_codes)
    if missing:
        log.warning("supervised %s: task classes absent from the pool: %s", pool, missing)
    val = load_labelled(Path(cfg.data_dir) / "val", None)
    history, samples = result["history"], result["samples"]
    metrics: dict[str, Any] = {
        "pool": pool,
        "model": bundle.name,
        "steps": result["steps"],
        "samples": samples,
        "batch_size": result["batch_size"],
        "final_loss": history[-1]["loss"],
        "final_loss_avg": history[-1]["loss_avg"],
        "val_accuracy": accuracy(task_clf, val, cfg.eval_batch_size, device),
        "pool_samples": result["pool_samples"],
        "pool_classes": len(pool_classes),
        "task_classes": len(task_codes),
        "task_classes_missing": missing,
        "params": sum(p.numel() for p in clf.parameters()),
        **_flops(bundle.config, samples),
        "training_fingerprint": fingerprint(spec),
        "reused": False,
    }
    meta = {
        "model_name": bundle.name,
        "model_config": bundle.config,
        "kind": KIND,
        "pool": pool,
        "classnames": task_names,
        "codepoints": task_codes,
        "pool_codepoints": pool_classes,
        "training_spec": spec,
    }
    _write_outputs(run_path(cfg, pool), pool, task_clf.cpu(), meta, metrics, history)
    return metrics


def _run(
    cfg: SupervisedConfig,
    pretrain: PretrainConfig,
    pool: str,
    tracker: Tracker,
    progress: bool,
) -> dict[str, Any]:
    wall = time.perf_counter()
    device = D.resolve_device(pretrain.device)
    T.check_precision(pretrain.precision, device)
    out = run_path(cfg, pool)
    load_info(pool_path(cfg, pool))  # fail fast, naming the fix, if fetch has not run
    bundle = build_tower(pretrain, device)
    spec = training_spec(cfg, pretrain, pool, pool_path(cfg, pool), bundle)
    fp = fingerprint(spec)
    claim_run_dir(out, spec, f"supervised {pool}")
    tracker.set_tags({"clipshift.pool": pool, "clipshift.training_fingerprint": fp})
    done = _finished(out, pool, fp)
    if done is not None:
        log.info("supervised %s: reusing the finished run in %s (spec %s)", pool, out, fp)
        return {**done, **dict.fromkeys(TIMING_KEYS), "reused": True}
    (out / INDEX_FILE).unlink(missing_ok=True)  # no index while the folder is being rewritten
    trained = _train(cfg, pretrain, pool, bundle, device, tracker, progress)
    metrics = _evaluate_and_save(cfg, pool, bundle, trained, spec, device)
    seconds = trained[2]["train_time_s"]
    timings = {
        "samples_per_s": metrics["samples"] / seconds if seconds else None,
        "train_time_s": round(seconds, 3),
        "wall_time_s": round(time.perf_counter() - wall, 3),
    }
    return {**metrics, **timings}


def run_supervised(
    cfg: SupervisedConfig,
    pretrain: PretrainConfig,
    pool: str,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the supervised control on ``pool`` (or reuse a finished run with the same spec).

    Returns the metrics written to ``<out_dir>/<pool>/metrics.json`` plus this process's
    timings (:data:`TIMING_KEYS`; None for a reused run), which are not written there.
    """
    check_run(cfg, pretrain, pool)
    previous_threads = torch.get_num_threads()
    if D.resolve_device(pretrain.device).type == "cpu":
        T.set_threads()
    try:
        with output_lock(run_path(cfg, pool)):  # a second run on this folder waits
            return _run(cfg, pretrain, pool, tracker or NullTracker(), progress)
    finally:
        torch.set_num_threads(previous_threads)
