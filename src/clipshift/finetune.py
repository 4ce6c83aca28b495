"""Adapting a pretrained CLIP to the reference task: zero-shot, end-to-end, linear probe, k-NN.

- **Zero-shot**: the vision tower plus a head of prompt-ensembled class embeddings
  (:mod:`clipshift.zeroshot`).
- **End-to-end** (WiSE-FT's "standard fine-tuning", Wortsman et al. 2022): start from the
  zero-shot classifier and train the whole vision tower and the head with cross-entropy,
  AdamW and a warmup + cosine schedule. The text tower is not used after the head is built.
- **Linear probe** (CLIP's protocol, Radford et al. 2021, §3.2): an L2-regularised logistic
  regression on frozen, L2-normalised features; the regularisation strength is chosen on the
  validation split from a small log-spaced grid.
- **k-NN** (DINO's evaluation, Caron et al. 2021, ``eval_knn.py``): cosine similarity to the
  training features, the k nearest vote with weight exp(similarity / T), T = 0.07.

:func:`run_finetune` is the stage: it writes every model plus ``index.json`` (see
:mod:`clipshift.registry`) under ``cfg.out_dir``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipshift import distributed as D
from clipshift.checkpoints import load_checkpoint, save_checkpoint
from clipshift.classifier import (
    ImageClassifier,
    clip_classifier,
    default_device,
    extract_features,
    make_head,
    predict_logits,
    save_classifier,
    to_model_input,
)
from clipshift.config import FinetuneConfig
from clipshift.data.shards import dataset_fingerprint, sha256_file
from clipshift.errors import CheckpointError, DataError
from clipshift.io_utils import write_json_atomic
from clipshift.models import ClipBundle, create_clip
from clipshift.registry import ModelEntry, write_index
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.training_spec import canonical, claim_run_dir, fingerprint, section_spec
from clipshift.zeroshot import zeroshot_head

KNN_FORMAT = "clipshift-knn-v1"
KNN_TEMPERATURE = 0.07  # DINO's default; sharper than 1, softer than a hard majority vote
PRETRAINED_FILE = "checkpoint.pt"
SPLITS = ("train", "val")  # the data the stage trains and selects on


# --------------------------------------------------------------------------------------------
# zero-shot


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> ClipBundle:
    """A CLIP from a checkpoint written by the pretrain stage (``save_open_clip_checkpoint``)."""
    state = load_checkpoint(path)
    missing = [k for k in ("state_dict", "name", "model_config") if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' lacks {missing}; it was not written by clipshift pretrain — "
            "re-run `dvc repro pretrain`"
        )
    bundle = create_clip(state["name"], device=device, config=state["model_config"])
    bundle.model.load_state_dict(state["state_dict"])
    bundle.model.eval()
    return bundle


def zeroshot_classifier(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> ImageClassifier:
    """The zero-shot classifier of a CLIP: its vision tower + logit_scale · prompt-ensemble head."""
    device = next(bundle.model.parameters()).device
    head = zeroshot_head(bundle.model, bundle.tokenizer, classnames, templates, device, batch_size)
    return clip_classifier(bundle.model, head).to(device)


# --------------------------------------------------------------------------------------------
# end-to-end training (also used for the from-scratch baselines)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random zoom-crop, shift and brightness/contrast jitter of a uint8 batch, batched.

    No flips: many emoji are not mirror-symmetric in meaning (arrows, hands, text), so a flip
    can change the class. Zoom 0.75–1 with the crop anywhere inside the image ≈ torchvision's
    RandomResizedCrop with a mild scale range; ±6 % extra shift (border-padded).
    """
    n = images.shape[0]
    x = images.float() / 255.0

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    scale = uniform(0.75, 1.0)
    tx = (1 - scale) * uniform(-1, 1) + uniform(-0.06, 0.06)
    ty = (1 - scale) * uniform(-1, 1) + uniform(-0.06, 0.06)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(0.8, 1.2).view(n, 1, 1, 1)
    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def cosine_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def accuracy_of(
    clf: ImageClassifier, data, batch_size: int = 256, device: str | torch.device | None = None
) -> float:
    logits = predict_logits(clf, data.images, batch_size, to_model_input, device)
    return float((logits.argmax(dim=1) == torch.as_tensor(data.labels)).float().mean())


def finetune_end_to_end(
    clf: ImageClassifier,
    train,
    val=None,
    *,
    epochs: int,
    lr: float,
    head_lr_scale: float = 1.0,
    batch_size: int = 64,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    grad_clip_norm: float | None = 1.0,
    use_augment: bool = True,
    seed: int = 0,
    tracker: Tracker | None = None,
    log_prefix: str = "finetune",
    progress: bool = False,
    device: str | torch.device | None = None,
) -> ImageClassifier:
    """Train every parameter of ``clf`` (tower + head) on ``train`` with cross-entropy.

    AdamW + linear warmup (``warmup_fraction`` of the steps) + cosine decay; the head learns at
    ``lr * head_lr_scale`` (a head far from the task's, like a weak zero-shot head, must move
    fast or the tower distorts its features to fit it). Batches are shuffled
    by a generator seeded with ``seed`` (so a run is reproducible on one device). Logs
    ``<log_prefix>/loss`` per step and ``<log_prefix>/val_accuracy`` per epoch. Returns
    ``clf`` (trained in place, in eval mode).

    Under torchrun (an initialised process group) the model is wrapped in DDP and every rank
    draws the same global batch (same generator) and takes its slice of it: ``batch_size``
    stays the global batch, and the gradient is that of the global-batch mean loss.
    """
    tracker = tracker or NullTracker()
    device = torch.device(device) if device is not None else default_device()
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    n = len(labels)
    if n == 0:
        raise DataError("the train split is empty; check data/fetch/train and the exclude lists")
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    clf.to(device).train()
    model = _ddp(clf, device)
    size = clf.visual.image_size[0] if hasattr(clf.visual, "image_size") else None
    head = list(clf.head.parameters())
    tower = [p for p in clf.parameters() if all(p is not h for h in head)]
    groups = [{"params": tower, "lr": lr}, {"params": head, "lr": lr * head_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total, int(warmup_fraction * total))
    )
    gen = torch.Generator().manual_seed(seed)
    bar = _progress(total, progress and D.is_main(), log_prefix)
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = train.images[idx]
            if use_augment:
                batch = augment(batch, gen)  # the whole global batch: same draws as one process
            mine, weight = _rank_slice(len(idx))
            logits = model(to_model_input(batch[mine], size).to(device))
            # sum over my rows / global rows, times world (DDP averages gradients over ranks):
            # the gradient of the global-batch mean, whatever the split
            part = F.cross_entropy(logits, labels[idx][mine].to(device), reduction="sum")
            loss = part * weight / len(idx)
            optimizer.zero_grad(set_to_none=True)
            (loss * D.get_world_size()).backward()
            if grad_clip_norm:
                nn.utils.clip_grad_norm_(clf.parameters(), grad_clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
            if step % 10 == 0 or step == total:
                global_loss = float(D.all_reduce_mean(loss.detach())) * D.get_world_size()
                tracker.log_metrics({f"{log_prefix}/loss": global_loss}, step=step)
        if val is not None and D.is_main():
            acc = accuracy_of(clf, val, 256, device)
            tracker.log_metrics({f"{log_prefix}/val_accuracy": acc}, step=step)
            clf.train()
    if bar is not None:
        bar.close()
    return clf.eval()


def _ddp(clf: nn.Module, device: torch.device) -> nn.Module:
    """``clf`` wrapped in DDP under torchrun (gradients all-reduced), itself otherwise."""
    if D.get_world_size() == 1:
        return clf
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(clf, device_ids=ids, broadcast_buffers=False)


def _rank_slice(rows: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of ``rows`` and the weight of its loss.

    A rank left with no rows (a last batch smaller than the world) still runs one row with
    weight 0, so that every rank takes part in DDP's gradient all-reduce.
    """
    world, rank = D.get_world_size(), D.get_rank()
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    return (slice(lo, hi), 1.0) if hi > lo else (slice(0, 1), 0.0)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------
# linear probe


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, steps: int, lr: float, seed: int
) -> nn.Linear:
    """Full-batch Adam on mean cross-entropy + l2/2 · ||W||² (bias unpenalised)."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
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
) -> tuple[nn.Linear, dict[str, Any]]:
    """A logistic-regression head on (L2-normalised) features.

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
        head = _fit_logistic(x, y, num_classes, wd, steps, lr, seed)
        return head, {"weight_decay": wd, "val_accuracy": {}}
    xv, yv = prep(features_val), torch.as_tensor(labels_val, dtype=torch.long)
    scores: dict[float, float] = {}
    heads: dict[float, nn.Linear] = {}
    for wd in grid:
        heads[wd] = _fit_logistic(x, y, num_classes, wd, steps, lr, seed)
        scores[wd] = float((heads[wd](xv).argmax(1) == yv).float().mean())
    best = max(grid, key=lambda w: (scores[w], w))
    return heads[best], {
        "weight_decay": best,
        "val_accuracy": {str(k): v for k, v in scores.items()},
    }


# --------------------------------------------------------------------------------------------
# k-NN


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


# --------------------------------------------------------------------------------------------
# the stage


def find_pools(pretrain_dir: str | Path) -> list[str]:
    """Pools with a pretrained checkpoint: ``<pretrain_dir>/<pool>/checkpoint.pt``."""
    root = Path(pretrain_dir)
    return sorted(p.parent.name for p in root.glob(f"*/{PRETRAINED_FILE}"))


def _load_split(data_dir: str | Path, name: str):
    from clipshift.data.loaders import load_labelled

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
    main: bool = True  # under torchrun only rank 0 writes files and logs

    def save(self, path: str, clf: ImageClassifier, meta: dict) -> None:
        if self.main:
            save_classifier(self.out / path, clf, {**meta, "training_spec": self.spec})

    def add(self, entry: ModelEntry, seconds: float, val_accuracy: float | None) -> None:
        entry.extra.update({"train_seconds": round(seconds, 2), "val_accuracy": val_accuracy})
        self.entries.append(entry)
        self.summary["models"][entry.id] = {"kind": entry.kind, "pool": entry.pool, **entry.extra}
        if val_accuracy is not None:
            self.tracker.log_metrics({f"val_accuracy/{entry.id}": val_accuracy})


def _val_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == torch.as_tensor(labels)).float().mean())


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
    st.add(entry, time.perf_counter() - t0, accuracy_of(zs, st.val, st.cfg.batch_size))
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
            _val_accuracy(head(F.normalize(f_val, dim=-1)), st.val.labels),
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
    st.add(entry, 0.0, _val_accuracy(probs, st.val.labels))


def _end_to_end(st: _Stage, pool: str, zs: ImageClassifier, meta: dict) -> None:
    """The main fine-tune (``e2e_lr``), then one per ``soup_lrs`` entry (seed + i)."""
    cfg = st.cfg
    for i, lr in enumerate([cfg.e2e_lr, *cfg.soup_lrs]):
        t0 = time.perf_counter()
        clf = copy.deepcopy(zs)
        finetune_end_to_end(
            clf,
            st.train,
            st.val,
            epochs=cfg.e2e_epochs,
            lr=lr,
            head_lr_scale=cfg.e2e_head_lr_scale,
            batch_size=cfg.e2e_batch_size,
            seed=cfg.seed + i,
            tracker=st.tracker,
            log_prefix=f"finetune/{pool}-{i}",
            progress=st.progress,
            device=st.device,
        )
        name = f"finetuned-{pool}-{i}"
        facts = {"lr": lr, "seed": cfg.seed + i}
        st.save(f"{name}.pt", clf, {**meta, "kind": "finetuned", **facts})
        entry = ModelEntry(
            id=name, kind="finetuned", pool=pool, path=f"{name}.pt", extra={**facts, "main": i == 0}
        )
        st.add(entry, time.perf_counter() - t0, accuracy_of(clf, st.val, cfg.batch_size))


def _baselines(st: _Stage) -> None:
    from clipshift.baselines import train_baselines

    image_size = int(st.train.images.shape[-1])
    trained = train_baselines(
        st.cfg.baselines, st.train, st.val, image_size, st.cfg.seed, st.tracker, device=st.device
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
    the models, ``index.json`` and ``finetune.json`` under ``cfg.out_dir``; returns the summary.

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
    return D.broadcast_object(st.summary)


# --------------------------------------------------------------------------------------------
# command line (the entry point torchrun launches on every rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clipshift finetune stage (one rank)")
    parser.add_argument("--config-json", required=True, help="a FinetuneConfig as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = FinetuneConfig.model_validate_json(Path(args.config_json).read_text())
    return D.run_on_rank(
        lambda: run_finetune(cfg, progress=not args.no_progress),
        lambda s: {mid: m.get("val_accuracy") for mid, m in s["models"].items()},
    )


if __name__ == "__main__":
    raise SystemExit(main())
