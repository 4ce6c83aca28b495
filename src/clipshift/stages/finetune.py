"""The finetune stage: adapt every pretrained CLIP to the reference task.

For every pool: the zero-shot classifier (:mod:`clipshift.methods.zeroshot`), a linear probe
(:mod:`clipshift.methods.linear_probe`) and a k-NN classifier (:mod:`clipshift.methods.knn`) on
one feature pass of the frozen tower; for ``cfg.pool``, the end-to-end fine-tunes
(:mod:`clipshift.methods.finetuning`); then the reference-only baselines
(:mod:`clipshift.methods.baselines`). :func:`run_finetune` writes every model plus
``index.json`` (see :mod:`clipshift.registry`) under ``cfg.out_dir``.

``cfg.out_dir`` is a DVC output, so no timing goes into it: each model's training time is
returned in the summary's ``train_seconds``, which the flow writes to
``metrics/finetune.json`` and MLflow.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipshift import distributed as D
from clipshift.classifier import ImageClassifier, extract_features, make_head, save_classifier
from clipshift.config import FinetuneConfig, SoupIngredient
from clipshift.data.loaders import load_labelled
from clipshift.data.shards import dataset_fingerprint, sha256_file
from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic
from clipshift.methods.baselines import train_baselines
from clipshift.methods.finetuning import finetune_end_to_end
from clipshift.methods.knn import KNN_TEMPERATURE, knn_predict, save_knn
from clipshift.methods.linear_probe import train_linear_probe
from clipshift.methods.metrics import accuracy, top1
from clipshift.methods.zeroshot import zeroshot_classifier
from clipshift.models import ClipBundle, load_pretrained
from clipshift.parallel import Run, run_side_by_side, worker_count
from clipshift.registry import PRETRAINED_FILE, ModelEntry, find_pools, write_index
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.training_spec import canonical, claim_run_dir, fingerprint, section_spec

SPLITS = ("train", "val")  # the data the stage trains and selects on


# --------------------------------------------------------------------------------------------
# the stage


def _load_split(data_dir: str | Path, name: str):
    return load_labelled(Path(data_dir) / name, None)


def _clip_meta(
    bundle: ClipBundle, classes: Sequence[str], pool: str, templates: Sequence[str]
) -> dict:
    return {
        "model_name": bundle.name,
        "model_config": bundle.config,
        "classnames": list(classes),
        "kind": "zeroshot",
        "pool": pool,
        "templates": list(templates),
    }


@dataclass
class _Stage:
    """What every step of the finetune stage shares; ``add`` saves nothing, it records."""

    cfg: FinetuneConfig
    out: Path
    train: Any
    val: Any
    classes: list[str]
    device: torch.device
    tracker: Tracker
    progress: bool
    spec: dict[str, Any] = field(default_factory=dict)
    entries: list[ModelEntry] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=lambda: {"models": {}})
    train_seconds: dict[str, float] = field(default_factory=dict)  # not written to out
    main: bool = True  # under torchrun only rank 0 writes files and logs

    def save(self, path: str, clf: ImageClassifier, meta: dict) -> None:
        if self.main:
            save_classifier(self.out / path, clf, {**meta, "training_spec": self.spec})

    def workers(self, runs: int) -> int:
        """Runs side by side: one per core on a CPU; under torchrun the ranks share each run."""
        return 1 if D.is_initialized() else worker_count(runs, self.device)

    def add(self, entry: ModelEntry, seconds: float, val_accuracy: float | None) -> None:
        entry.extra.update({"val_accuracy": val_accuracy})
        self.entries.append(entry)
        self.summary["models"][entry.id] = {"kind": entry.kind, "pool": entry.pool, **entry.extra}
        self.train_seconds[entry.id] = round(seconds, 2)
        if val_accuracy is not None:
            self.tracker.log_metrics({f"val_accuracy/{entry.id}": val_accuracy})


def _zeroshot(st: _Stage, pool: str, pretrained: Path) -> tuple[ImageClassifier, dict]:
    t0 = time.perf_counter()
    bundle = load_pretrained(pretrained, st.device)
    zs = zeroshot_classifier(bundle, st.classes, st.cfg.templates, st.cfg.batch_size)
    meta = _clip_meta(bundle, st.classes, pool, st.cfg.templates)
    st.save(f"zeroshot-{pool}.pt", zs, meta)
    entry = ModelEntry(
        id=f"zeroshot-{pool}",
        kind="zeroshot",
        pool=pool,
        path=f"zeroshot-{pool}.pt",
        extra={"pretrained": str(pretrained)},
    )
    st.add(entry, time.perf_counter() - t0, accuracy(zs, st.val, st.cfg.batch_size))
    return zs, meta


def _linear_and_knn(st: _Stage, pool: str, zs: ImageClassifier, meta: dict) -> None:
    """Linear probe and k-NN on one feature pass of the frozen pretrained tower."""
    cfg, t0 = st.cfg, time.perf_counter()
    f_train = extract_features(zs.visual, st.train.images, cfg.batch_size)
    f_val = extract_features(zs.visual, st.val.images, cfg.batch_size)
    wd = cfg.linear_weight_decay
    head, info = train_linear_probe(
        f_train,
        st.train.labels,
        f_val,
        st.val.labels,
        num_classes=len(st.classes),
        weight_decays=[wd * 10.0**e for e in (-2, -1, 0, 1, 2)] if wd > 0 else [0.0],
        steps=cfg.linear_epochs,
        lr=cfg.linear_lr,
        seed=cfg.seed,
        init=zs.head,  # from the zero-shot head, as the wise-ft code's linear classifier
    )
    probe = ImageClassifier(copy.deepcopy(zs.visual), make_head(head.weight, head.bias), True)
    st.save(f"linear-{pool}.pt", probe, {**meta, "kind": "linear", **info})
    entry = ModelEntry(
        id=f"linear-{pool}",
        kind="linear",
        pool=pool,
        path=f"linear-{pool}.pt",
        extra={"weight_decay": info["weight_decay"]},
    )
    with torch.no_grad():
        st.add(
            entry,
            time.perf_counter() - t0,
            top1(head(F.normalize(f_val, dim=-1)), st.val.labels),
        )

    knn_meta = {
        **meta,
        "kind": "knn",
        "k": cfg.knn_k,
        "temperature": KNN_TEMPERATURE,
        "visual_checkpoint": f"zeroshot-{pool}.pt",
        "num_classes": len(st.classes),
    }
    knn_meta["training_spec"] = st.spec
    save_knn(st.out / f"knn-{pool}.pt", f_train, st.train.labels, knn_meta)
    probs = knn_predict(f_train, st.train.labels, f_val, cfg.knn_k, len(st.classes))
    entry = ModelEntry(
        id=f"knn-{pool}", kind="knn", pool=pool, path=f"knn-{pool}.pt", extra={"k": cfg.knn_k}
    )
    st.add(entry, 0.0, top1(probs, st.val.labels))


def e2e_runs(cfg: FinetuneConfig) -> list[SoupIngredient]:
    """Every end-to-end fine-tune of the stage: index 0 is the main run (``e2e_lr``,
    ``e2e_epochs``, default augmentation), then ``soup_ingredients``; run ``i`` has seed + i."""
    main = SoupIngredient(lr=cfg.e2e_lr, epochs=cfg.e2e_epochs)
    return [main, *cfg.soup_ingredients]


def _end_to_end(st: _Stage, pool: str, zs: ImageClassifier, meta: dict) -> None:
    """The fine-tunes of :func:`e2e_runs`, each from the zero-shot classifier (WiSE-FT's
    θ0): the main one WiSE-FT interpolates, the others are soup ingredients. They train side
    by side on a CPU (each is seeded by its index, so where it trains does not matter)."""
    cfg = st.cfg
    specs = e2e_runs(cfg)
    common = {
        "train": st.train,
        "val": st.val,
        "head_lr_scale": cfg.e2e_head_lr_scale,
        "batch_size": cfg.e2e_batch_size,
        "progress": st.progress,
        "device": st.device,
    }
    runs = [
        Run(
            finetune_end_to_end,
            {
                **common,
                "clf": copy.deepcopy(zs),
                "epochs": run.epochs,
                "lr": run.lr,
                "augment_strength": run.augment,
                "label_smoothing": run.label_smoothing,
                "seed": cfg.seed + i,
                "log_prefix": f"finetune/{pool}-{i}",
            },
            st.tracker,
            cost=run.epochs,
        )
        for i, run in enumerate(specs)
    ]
    t0 = time.perf_counter()
    trained = run_side_by_side(runs, st.workers(len(runs)))
    seconds = (time.perf_counter() - t0) / len(runs)  # side by side: each run's share
    for i, (run, clf) in enumerate(zip(specs, trained, strict=True)):
        name = f"finetuned-{pool}-{i}"
        facts = {**run.model_dump(), "seed": cfg.seed + i}
        st.save(f"{name}.pt", clf, {**meta, "kind": "finetuned", **facts})
        entry = ModelEntry(
            id=name, kind="finetuned", pool=pool, path=f"{name}.pt", extra={**facts, "main": i == 0}
        )
        st.add(entry, seconds, accuracy(clf, st.val, cfg.batch_size))


def _baselines(st: _Stage) -> None:
    image_size = int(st.train.images.shape[-1])
    trained = train_baselines(
        st.cfg.baselines,
        st.train,
        st.val,
        image_size,
        st.cfg.seed,
        st.tracker,
        device=st.device,
        workers=st.workers(len(st.cfg.baselines)),
    )
    for model in trained:
        path = f"{model.id}.pt"
        st.save(path, model.clf, {**model.meta, "classnames": st.classes})
        entry = ModelEntry(
            id=model.id, kind="baseline", pool=None, path=path, extra=dict(model.meta["spec"])
        )
        st.add(entry, model.seconds, model.val_accuracy)


def training_spec(cfg: FinetuneConfig, pools: Sequence[str], world_size: int) -> dict[str, Any]:
    """Everything that determines the stage's models: its settings, the pretrained checkpoints'
    bytes, the train/val data and the number of ranks (see :mod:`clipshift.training_spec`)."""
    spec = section_spec("finetune", cfg)
    pretrain_dir, data_dir = Path(cfg.pretrain_dir), Path(cfg.data_dir)
    spec["finetune.pretrained_sha256"] = {
        pool: sha256_file(pretrain_dir / pool / PRETRAINED_FILE) for pool in pools
    }
    spec["finetune.data"] = {split: dataset_fingerprint(data_dir / split) for split in SPLITS}
    spec["finetune.world_size"] = world_size
    return canonical(spec)


def run_finetune(
    cfg: FinetuneConfig, tracker: Tracker | None = None, progress: bool = True
) -> dict:
    """The finetune stage: for every pretrained pool a zero-shot classifier, a linear probe and
    a k-NN classifier; for ``cfg.pool`` the end-to-end fine-tunes; then the baselines. Writes
    the models, ``index.json`` and ``finetune.json`` under ``cfg.out_dir``; returns the summary
    (finetune.json's content) plus ``train_seconds`` ({model id: seconds}, not written there).

    Under torchrun every rank calls it: the end-to-end fine-tunes and the baselines train with
    DDP, the one-pass linear probe and k-NN run on rank 0 alone, and only rank 0 writes files
    and logs; every rank returns rank 0's summary.
    """
    dist = D.init_distributed("auto")
    pools = find_pools(cfg.pretrain_dir)
    if cfg.pool not in pools:
        raise DataError(
            f"no pretrained model for pool '{cfg.pool}' in {cfg.pretrain_dir} (found {pools}); "
            "run `dvc repro pretrain` or set finetune.pool to one of them"
        )
    train, val = _load_split(cfg.data_dir, "train"), _load_split(cfg.data_dir, "val")
    if list(train.classes or []) != list(val.classes or []) or not train.classes:
        raise DataError("train and val must list the same task classes; re-run fetch")
    out = Path(cfg.out_dir)
    spec = training_spec(cfg, pools, dist.world_size)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # models made with other settings go to superseded/, never mixed with this run's
        claim_run_dir(out, spec, "finetune")
    D.barrier()
    st = _Stage(
        cfg,
        out,
        train,
        val,
        list(train.classes),
        dist.device,
        tracker if tracker is not None and dist.is_main else NullTracker(),
        progress and dist.is_main,
        spec=spec,
        main=dist.is_main,
    )
    st.summary["pools"] = pools
    st.summary["training_fingerprint"] = fingerprint(spec)
    st.tracker.set_tags({"clipshift.training_fingerprint": fingerprint(spec)})
    st.tracker.log_params(
        {"finetune.pools": ",".join(pools), "finetune.num_classes": len(st.classes)}
    )
    for pool in pools:
        zs, meta = _zeroshot(st, pool, Path(cfg.pretrain_dir) / pool / PRETRAINED_FILE)
        # Linear probe and k-NN cost one feature pass: done for every pool, so that pools can
        # be compared on them too; end-to-end fine-tuning only for the chosen pool.
        if st.main:
            _linear_and_knn(st, pool, zs, meta)
        if pool == cfg.pool:
            _end_to_end(st, pool, zs, meta)
    _baselines(st)
    if st.main:
        st.summary["world_size"] = dist.world_size
        write_index(out, st.entries)
        write_json_atomic(out / "finetune.json", st.summary)
        st.tracker.log_dict(st.summary, "finetune.json")
    return D.broadcast_object({**st.summary, "train_seconds": st.train_seconds})
