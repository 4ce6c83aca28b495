"""Every knob of the pipeline, declared once.

Each stage has one pydantic model. The same models are the Prefect flow parameters (so the
UI draws a form with defaults and descriptions) and the schema of ``params.yaml``. Unknown
keys, wrong types and out-of-range values fail here, before any work starts, with a message
that names the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clipshift.errors import ConfigError

Style = Literal[
    "twemoji",
    "openmoji",
    "fluent",
    "noto",
    "noto_line",
    "fluent_line",
    "emojione",
    "emojione_v1",
    "fxemoji",
    "silhouette",
    "grayscale",
    "corrupt",
]


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, values are re-validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def known_architectures() -> set[str]:
    """open_clip's architecture names plus ours, read from the config JSONs (no torch import)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(__file__).parent / "model_configs"]
    if spec and spec.submodule_search_locations:
        dirs += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    return {f.stem for d in dirs for f in d.glob("*.json")}


def check_model_name(value: str) -> str:
    if value.endswith(".json"):
        if not Path(value).exists():
            raise ValueError(f"model config file '{value}' does not exist")
        return value
    known = known_architectures()
    if value not in known:
        hint = sorted(k for k in known if k.lower().startswith(value.lower()[:4]))[:6]
        raise ValueError(
            f"'{value}' is not an open_clip architecture; use a name from "
            f"open_clip.list_models() (e.g. {hint or sorted(known)[:6]}) or a config JSON path"
        )
    return value


HF_PREFIX = "hf-hub:"  # pretrain.pretrained: a Hugging Face Hub id, not a tag


def hub_id(value: str) -> str | None:
    """``org/name`` of an ``hf-hub:org/name`` value, else None (a tag)."""
    return value[len(HF_PREFIX) :] if value.startswith(HF_PREFIX) else None


def check_pretrained(model: str, value: str) -> str:
    """``value`` if it is an ``hf-hub:org/name`` id or a tag open_clip publishes for
    ``model``; else ValueError listing the tags that ``model`` has."""
    repo = hub_id(value)
    if repo is not None:
        parts = repo.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"'{value}' is not a Hugging Face Hub id; write hf-hub:<org>/<name>, e.g. "
                "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
            )
        return value
    import open_clip  # torch comes with it: imported only when a tag is checked

    tags = open_clip.list_pretrained_tags_by_model(model)
    if not open_clip.is_pretrained_cfg(model, value):
        listed = ", ".join(tags) if tags else "none"
        raise ValueError(
            f"'{value}' is not an open_clip pretrained tag of pretrain.model '{model}' (its "
            f"tags: {listed}); use one of them, an hf-hub:<org>/<name> id, or "
            "pretrain.init_checkpoint for a checkpoint file"
        )
    return value


def check_existing_path(value: str | None) -> str | None:
    """Local paths must exist; remote URIs (s3://, https://) are checked when fetched."""
    if value is None or "://" in value:
        return value
    if not Path(value).exists():
        raise ValueError(f"path '{value}' does not exist (fix the path or remove the key)")
    return value


# --------------------------------------------------------------------------------------------
# fetch


class WorldConfig(StrictModel):
    """The built-in emoji world: a small DomainNet made of open-licensed emoji art."""

    image_size: int = Field(32, ge=16, le=512, description="Side of every rendered image, px.")
    num_classes: int = Field(
        100,
        ge=2,
        le=1000,
        description="Classes of the reference task (emoji present in all styles).",
    )
    reference_style: Style = Field("twemoji", description="Style of the train/val/test splits.")
    shift_styles: list[Style] = Field(
        default_factory=lambda: [  # type: ignore[arg-type]  # literals inferred as str
            "openmoji",
            "noto",
            "fluent",
            "grayscale",
            "corrupt",
        ],
        description="One shift test set per style, on the task's classes. At 32 px the line "
        "styles (noto_line, fluent_line) and silhouettes carry no signal (zero-shot at chance "
        "in the pilot), so they are not defaults.",
    )
    train_per_class: int = Field(
        24, ge=1, le=10000, description="Reference train images per class."
    )
    val_per_class: int = Field(6, ge=1, le=10000, description="Reference val images per class.")
    test_per_class: int = Field(10, ge=1, le=10000, description="Reference test images per class.")
    shift_per_class: int = Field(10, ge=1, le=10000, description="Images per class in each shift.")
    pool_size: int = Field(
        12000, ge=10, le=10_000_000, description="Image-caption pairs in each pretraining pool."
    )
    pool_universe: int | None = Field(
        200,
        ge=2,
        le=100_000,
        description="Distinct emoji the pools (and retrieval) draw from: the task classes plus "
        "a seeded sample of others; null = every emoji all styles can draw.",
    )
    diverse_styles: list[Style] = Field(
        default_factory=lambda: [  # type: ignore[arg-type]  # literals inferred as str
            "twemoji",
            "openmoji",
            "noto",
            "emojione",
            "emojione_v1",
            "fxemoji",
        ],
        description="Styles mixed in the 'diverse' pool. A pool never holds a drawing that an "
        "evaluation set shows: task classes appear only in styles whose family (emojione, "
        "fxemoji, ...) no evaluation set uses; other emoji in every style.",
    )
    narrow_styles: list[Style] = Field(
        default_factory=lambda: ["twemoji", "emojione"],  # type: ignore[arg-type]
        description="Styles of the 'narrow' pool (same rule as diverse_styles).",
    )
    retrieval_size: int = Field(
        500, ge=10, le=1_000_000, description="Held-out image-caption pairs for retrieval eval."
    )
    caption_noise: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of pool captions made noisy (alt-text-like)."
    )
    shard_size: int = Field(2000, ge=1, le=1_000_000, description="Samples per webdataset shard.")

    @model_validator(mode="after")
    def _reference_not_a_shift(self) -> WorldConfig:
        if self.reference_style in self.shift_styles:
            raise ValueError(
                f"fetch.world.shift_styles contains the reference style "
                f"'{self.reference_style}'; a shift must differ from the reference"
            )
        if not self.diverse_styles or not self.narrow_styles:
            raise ValueError("fetch.world.diverse_styles and narrow_styles must not be empty")
        if self.pool_universe is not None and self.pool_universe < self.num_classes:
            raise ValueError(
                f"fetch.world.pool_universe={self.pool_universe} is below num_classes="
                f"{self.num_classes}; the pools must cover every task class (raise it or null)"
            )
        return self


class SourceConfig(StrictModel):
    """An external data source, given by URI, that fetch normalises into webdataset shards."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Dataset name in data/.")
    uri: str = Field(
        ...,
        description="local path, s3://bucket/key, https://… (with sha256), shard brace pattern "
        "like s3://b/{00000..00099}.tar, or an ImageFolder directory.",
    )
    role: Literal["pool", "shift", "test", "val", "train", "retrieval"] = Field(
        "shift", description="What the dataset is for in the study."
    )
    format: Literal["auto", "webdataset", "imagefolder", "file"] = Field(
        "auto", description="How to read the source; auto guesses from the URI."
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of a single downloaded file."
    )
    classnames: list[str] | None = Field(
        None, description="Class names in label order (ImageFolder: defaults to folder names)."
    )
    class_map: dict[str, str] | Literal["imagenet"] | None = Field(
        None,
        description="Folder name -> task class name, for shifts that cover a subset of the "
        "task's classes (ObjectNet), or 'imagenet': ImageNet-1k's WordNet-id folders (val, "
        "Sketch, and the 200 of -R/-A) or ImageNetV2's 0…999, named by open_clip's ImageNet "
        "class names (webdataset: cls is the ImageNet class index).",
    )
    max_samples: int | None = Field(None, ge=1, description="Stop after this many samples.")

    @model_validator(mode="after")
    def _names_or_imagenet(self) -> SourceConfig:
        if self.class_map == "imagenet" and self.classnames is not None:
            raise ValueError(
                f"source '{self.name}': class_map: imagenet names the classes itself; remove "
                "classnames"
            )
        return self


WORLD_POOLS = ("diverse", "narrow")  # the built-in world's pretraining pools (pool-<name>)


def world_dataset_names(world: WorldConfig) -> list[str]:
    """The datasets the built-in world writes (clipshift.data.world.build)."""
    shifts = [f"shift-{style}" for style in world.shift_styles]
    return ["train", "val", "test", *shifts, *(f"pool-{p}" for p in WORLD_POOLS), "retrieval"]


class FetchConfig(StrictModel):
    seed: int = Field(0, ge=0, description="Seed of every random choice in the world.")
    world: WorldConfig = Field(default_factory=WorldConfig)
    use_world: bool = Field(True, description="Build the built-in emoji world.")
    sources: list[SourceConfig] = Field(default_factory=list, description="Extra data sources.")
    out_dir: str = Field("data/fetch", description="Where datasets and the manifest go.")
    cache_dir: str = Field(".cache/clipshift", description="Downloads and art caches.")

    @model_validator(mode="after")
    def _names_unique(self) -> FetchConfig:
        names = [s.name for s in self.sources]
        world = set(world_dataset_names(self.world)) if self.use_world else set()
        problems = []
        if twice := sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"listed twice: {twice}")
        if taken := sorted(set(names) & world):
            problems.append(f"built by the world too: {taken} (or set fetch.use_world: false)")
        if problems:
            raise ValueError(
                "fetch.sources names must be unique and differ from the built-in world's "
                "datasets; rename the sources " + "; ".join(problems)
            )
        return self


# --------------------------------------------------------------------------------------------
# validate


class ValidateConfig(StrictModel):
    data_dir: str = Field("data/fetch", description="Output of fetch.")
    out_dir: str = Field("data/validate", description="Reports and Data Docs.")
    caption_min_chars: int = Field(3, ge=1, description="Shortest allowed caption.")
    caption_max_chars: int = Field(300, ge=1, description="Longest allowed caption.")
    leakage: Literal["drop", "fail"] = Field(
        "drop", description="What to do with test images duplicated in training data."
    )
    phash_max_distance: int = Field(
        2,
        ge=0,
        le=64,
        description="Hamming distance at or below which images are near-duplicates. 2 catches "
        "94 % of JPEG-q75 re-encodes and 99.7 % of 2x resizes of the built-in test images and "
        "flags 0.07 % of clean evaluation images against the pools (4: 98.7 %, 0.38 %). A "
        "re-render with other augmentation is no closer than another drawing: the drawing "
        "check, not the pHash, keeps those out.",
    )
    max_corrupt_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of undecodable samples tolerated per dataset."
    )
    min_per_class: int = Field(1, ge=1, description="Fewest examples of each class per split.")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError(
                f"validate.caption_min_chars ({self.caption_min_chars}) is larger than "
                f"validate.caption_max_chars ({self.caption_max_chars})"
            )
        return self


# --------------------------------------------------------------------------------------------
# distributed: how many processes run pretrain, finetune and evaluate


class DistributedConfig(StrictModel):
    """The ranks of a stage: ``nproc_per_node`` processes on each of ``nnodes`` nodes, started by
    torchrun (:func:`clipshift.distributed.launch`). One rank runs in-process, without torchrun.
    """

    nproc_per_node: int = Field(
        1, ge=1, le=64, description="Ranks per node: one per GPU (on CPU they share the cores)."
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Nodes. Above 1, every node runs `python -m clipshift.distributed launch` "
        "with the same settings (infra/k8s/torchrun-job.yaml does) and they meet at "
        "rdzv_endpoint.",
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^\S+:\d{1,5}$",
        description="host:port of the c10d rendezvous, reachable from every node (node 0 hosts "
        "it); needed when nnodes > 1.",
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes={self.nnodes} needs rdzv_endpoint: the host:port every node reaches "
                "for the c10d rendezvous (e.g. node0.example:29400); or set nnodes: 1"
            )
        return self


def _distributed_field() -> Any:
    return Field(
        default_factory=DistributedConfig,
        description="Ranks: nproc_per_node × nnodes processes under torchrun (1: in-process).",
    )


# --------------------------------------------------------------------------------------------
# pretrain


class TrainLoopConfig(StrictModel):
    """Optimisation knobs shared by contrastive pretraining and fine-tuning."""

    batch_size: int = Field(128, ge=1, le=65536, description="Global batch size (all ranks).")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before the cosine decay.")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm.")
    accum_steps: int = Field(1, ge=1, le=1024, description="Gradient accumulation micro-steps.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype; fp16 uses a GradScaler, bf16 needs device support."
    )
    workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes per rank.")
    log_every: int = Field(10, ge=1, description="Log metrics to MLflow every N steps.")
    checkpoint_every: int = Field(
        100, ge=1, description="Write a resumable checkpoint every N steps."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    distributed: DistributedConfig = _distributed_field()
    seed: int = Field(0, ge=0)


class PretrainConfig(TrainLoopConfig):
    # Settings that cannot change the trained weights (clipshift.training_spec): logging,
    # paths and the list of pools (each pool is its own run). Others enter the training spec
    # resolved: model → its architecture, init_checkpoint and pretrained → the starting
    # weights' sha256, device/loader → what 'auto' chose, distributed → the world size
    # (nproc_per_node × nnodes, as the ranks see it); workers counts only for the streaming
    # loader, whose sample order depends on it.
    # checkpoint_every stays in: the spike guard rolls back to the last checkpoint, so it can
    # change the weights.
    RESULT_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"log_every", "data_dir", "out_dir", "pools", "model", "init_checkpoint", "pretrained",
         "device", "loader", "distributed", "workers"}
    )  # fmt: skip

    data_dir: str = Field("data/fetch", description="Output of fetch (the pools live here).")
    out_dir: str = Field("models/pretrain", description="Checkpoints, one folder per pool.")
    pools: list[str] = Field(
        default_factory=lambda: ["diverse", "narrow"],
        description="Pools to pretrain on; one model each (the data-centric experiment).",
    )
    model: str = Field(
        "clipshift-vit-tiny-p8",
        description="open_clip architecture name, or a path to a model config JSON.",
    )
    init_checkpoint: str | None = Field(
        None, description="Start from this open_clip checkpoint (path or s3://) instead of scratch."
    )
    pretrained: str | None = Field(
        None,
        description="Start from published weights: an open_clip pretrained tag of `model` "
        "(open_clip.list_pretrained_tags_by_model) or hf-hub:<org>/<name>, loaded by open_clip "
        "through the Hugging Face cache (HF_HOME, HF_HUB_OFFLINE honoured).",
    )
    samples: int = Field(
        80000,
        ge=0,
        description="Training samples seen (sets the step count); 0 with pretrained or "
        "init_checkpoint records the starting model as it is, without training.",
    )
    gather_with_grad: bool = Field(False, description="DDP: backprop through gathered features.")
    local_loss: bool = Field(False, description="DDP: loss against local rows only.")
    max_rollbacks: int = Field(3, ge=0, description="Loss-spike rollbacks before giving up.")
    spike_factor: float = Field(
        3.0, gt=1, description="A loss above this many times the running median is a spike."
    )
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: decode the pool once into RAM, order exactly resumable; stream: "
        "webdataset shards; auto: memory when the decoded pool fits in 2 GiB.",
    )

    _model_known = field_validator("model")(check_model_name)
    _init_exists = field_validator("init_checkpoint")(check_existing_path)

    @field_validator("pools")
    @classmethod
    def _pools_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one pool, e.g. [diverse, narrow]")
        return value

    @model_validator(mode="after")
    def _one_starting_point(self) -> PretrainConfig:
        if self.init_checkpoint is not None and self.pretrained is not None:
            raise ValueError(
                f"init_checkpoint ('{self.init_checkpoint}') and pretrained "
                f"('{self.pretrained}') both name starting weights; set one of them to null"
            )
        if self.samples == 0 and self.init_checkpoint is None and self.pretrained is None:
            raise ValueError(
                "samples: 0 records the starting model without training, but there is none "
                "(pretrained and init_checkpoint are null); set one, or samples > 0"
            )
        if self.pretrained is not None:
            check_pretrained(self.model, self.pretrained)
        return self


# --------------------------------------------------------------------------------------------
# supervised: Fang et al.'s control (a)


class SupervisedConfig(StrictModel):
    """Fang et al. (2022)'s control (a): a supervised image classifier trained with
    cross-entropy on a pool's images, the label of each image being its emoji (the pool
    sample's ``codepoint``), at CLIP's compute. Everything that sets the training (model,
    seed, samples, batch size, optimiser, LR schedule, precision, device) is the pretrain
    section's: the classifier is CLIP's image tower, freshly initialised as pretrain does, and
    sees the same images in the same order and crops; it skips the text tower."""

    # Paths, the pool list (each pool is its own run) and the scoring batch cannot change
    # the trained weights (clipshift.training_spec).
    RESULT_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"data_dir", "out_dir", "pools", "eval_batch_size"}
    )

    data_dir: str = Field("data/fetch", description="Output of fetch (pools, manifest, val).")
    out_dir: str = Field(
        "models/supervised",
        description="One folder per pool holding supervised-<pool>.pt and its index.json "
        "(evaluate scores it with the other models); must sit directly under "
        "evaluate.models_dir.",
    )
    pools: list[str] = Field(
        default_factory=lambda: ["diverse"],
        description="Pools to train on (each must be a pretrain pool): one classifier each.",
    )
    eval_batch_size: int = Field(
        256, ge=1, le=65536, description="Batch size of the val-accuracy pass (not training)."
    )

    @field_validator("pools")
    @classmethod
    def _pools_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one pool, e.g. [diverse]")
        return value


# --------------------------------------------------------------------------------------------
# finetune


DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "an emoji of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "an icon of the {}.",
    "a {}.",
]


class BaselineSpec(StrictModel):
    """One 'standard' model trained only on the reference task."""

    width: int = Field(64, ge=8, le=4096, description="Vision tower width.")
    layers: int = Field(2, ge=1, le=64, description="Vision tower depth.")
    epochs: int = Field(10, ge=1, le=10000)
    fraction: float = Field(1.0, gt=0, le=1, description="Share of the train split used.")


def _default_baselines() -> list[BaselineSpec]:
    # Ten reference-only models spread over ID accuracy (measured on the earlier world: 0.1 to
    # 0.78); none near chance, which would bend the logit line.
    grid = [
        (64, 2, 24, 1.0),
        (64, 2, 8, 0.5),
        (64, 2, 16, 1.0),
        (96, 3, 6, 0.5),
        (96, 3, 12, 1.0),
        (128, 4, 4, 1.0),
        (128, 4, 10, 1.0),
        (128, 4, 20, 1.0),
        (96, 3, 18, 1.0),
        (96, 3, 24, 1.0),
    ]
    return [BaselineSpec(width=w, layers=d, epochs=e, fraction=f) for w, d, e, f in grid]


class SoupIngredient(StrictModel):
    """One extra end-to-end fine-tune; ingredients differ in cheap hyperparameters, as in
    Wortsman et al.'s model soups (LR, length, augmentation, label smoothing; seed by index)."""

    lr: float = Field(gt=0, le=1, description="Peak LR (the head's is lr × e2e_head_lr_scale).")
    epochs: int = Field(ge=1, le=1000)
    augment: float = Field(
        1.0, ge=0, le=2, description="Augmentation strength: 0 none, 1 the main run's ranges."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")


def _default_soup_ingredients() -> list[SoupIngredient]:
    # around the main run (4e-4, 8 epochs, augment 1): half its LR; its LR, shorter with
    # weaker augmentation and label smoothing; 3/4 its LR, shorter (28 epochs in all, 4 models)
    grid = [(2e-4, 8, 1.0, 0.0), (4e-4, 6, 0.5, 0.1), (3e-4, 6, 1.0, 0.0)]
    return [SoupIngredient(lr=lr, epochs=e, augment=a, label_smoothing=ls) for lr, e, a, ls in grid]


MIN_SOUP = 4  # models in a soup: the main fine-tune + at least 3 ingredients


class FinetuneConfig(StrictModel):
    # Paths and worker counts cannot change the models (clipshift.training_spec); the ranks
    # enter the training spec as the world size, the pretrained models as their sha256.
    RESULT_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"data_dir", "pretrain_dir", "out_dir", "workers", "distributed"}
    )

    data_dir: str = Field("data/fetch")
    pretrain_dir: str = Field("models/pretrain")
    out_dir: str = Field("models/finetune")
    pool: str = Field("diverse", description="Pretrained model to fine-tune (by pool).")
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        description="Prompt templates ('{}' is the class name) ensembled for the zero-shot head, "
        "or the name of one of open_clip's ImageNet sets: 'openai-imagenet' (CLIP's 80) or "
        "'simple-imagenet' (7).",
    )
    e2e_epochs: int = Field(
        8, ge=1, le=1000, description="Epochs of the main end-to-end fine-tune (WiSE-FT's θ1)."
    )
    e2e_lr: float = Field(
        4e-4,
        gt=0,
        le=1,
        description="Peak LR of the main end-to-end fine-tune (the head's: × e2e_head_lr_scale); "
        "below the pretraining LR (pretrain.lr), as WiSE-FT fine-tunes from θ0 rather than "
        "retrains. Chosen on val among pretrain.lr/10, /5 and /2.5 (the largest won: the "
        "short pretraining leaves the tower far from the task).",
    )
    e2e_head_lr_scale: float = Field(
        30.0,
        gt=0,
        le=10000,
        description="The head learns at LR times this, in every end-to-end fine-tune. WiSE-FT "
        "uses one LR (1), but here the zero-shot head is weak and barely moves at a small LR: "
        "in a val pilot (8 epochs at 1e-4) ×30 gave 0.44, ×10 0.37; at 3e-4, ×10 0.48, ×1 0.39.",
    )
    e2e_batch_size: int = Field(64, ge=1, le=65536)
    soup_ingredients: list[SoupIngredient] = Field(
        default_factory=_default_soup_ingredients,
        description="Extra end-to-end fine-tunes (seed + 1, + 2, …) that join the main one "
        "(augment 1, no label smoothing) as soup ingredients: none, or at least 3 (a soup of "
        "fewer than 4 models is a comparison of 2–3 models, not a soup).",
    )
    linear_epochs: int = Field(200, ge=1, le=100000, description="Full-batch linear-probe steps.")
    linear_lr: float = Field(1e-2, gt=0, le=10)
    linear_weight_decay: float = Field(1e-4, ge=0)
    knn_k: int = Field(10, ge=1, le=1000, description="Neighbours of the k-NN classifier.")
    baselines: list[BaselineSpec] = Field(
        default_factory=_default_baselines,
        description="Standard models trained from scratch on the reference task.",
    )
    batch_size: int = Field(128, ge=1, le=65536, description="Batch size for feature passes.")
    workers: int = Field(1, ge=0, le=64)
    seed: int = Field(0, ge=0)
    distributed: DistributedConfig = _distributed_field()

    @field_validator("templates", mode="before")
    @classmethod
    def _named_template_set(cls, value: Any) -> Any:
        if isinstance(value, str):  # function-local: open_clip (torch) only when named
            from clipshift.data.imagenet import template_set

            try:
                return template_set(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if "{}" not in t]
        if bad or not value:
            raise ValueError(f"every template needs a '{{}}' for the class name; bad: {bad}")
        return value

    @field_validator("soup_ingredients")
    @classmethod
    def _soup_or_none(cls, value: list[SoupIngredient]) -> list[SoupIngredient]:
        if 0 < len(value) < MIN_SOUP - 1:
            raise ValueError(
                f"a soup needs at least {MIN_SOUP} fine-tunes (the main one + at least "
                f"{MIN_SOUP - 1} soup_ingredients), got 1 + {len(value)}; list at least "
                f"{MIN_SOUP - 1} ingredients, or none (and set interpolate.soups: [])"
            )
        return value

    @field_validator("baselines")
    @classmethod
    def _enough_baselines(cls, value: list[BaselineSpec]) -> list[BaselineSpec]:
        # none: evaluate's line comes from evaluate.external_baselines alone (cross-checked)
        if 0 < len(value) < 3:
            raise ValueError(f"need at least 3 baseline models to fit a line, got {len(value)}")
        return value


# --------------------------------------------------------------------------------------------
# interpolate


PAPER_WISE_ALPHA = 0.5  # WiSE-FT's fixed mixing weight, reported beside the val-chosen α


class InterpolateConfig(StrictModel):
    data_dir: str = Field("data/fetch")
    finetune_dir: str = Field("models/finetune")
    out_dir: str = Field("models/interpolate")
    alphas: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        description="WiSE-FT mixing weights: 0 = zero-shot, 1 = fine-tuned; must include 0.5, "
        "the paper's fixed α, reported beside the α chosen on val.",
    )
    soups: list[Literal["uniform", "greedy"]] = Field(
        default_factory=lambda: ["uniform", "greedy"],  # type: ignore[arg-type]
        description="Soup recipes over the pool's fine-tunes (needs finetune.soup_ingredients); "
        "[] for none.",
    )
    batch_size: int = Field(256, ge=1, le=65536)

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"every WiSE-FT alpha must lie in [0, 1]; out of range: {bad}")
        if PAPER_WISE_ALPHA not in value:
            raise ValueError(
                f"alphas must include {PAPER_WISE_ALPHA}, WiSE-FT's fixed α, which is reported "
                "beside the α chosen on val; add it"
            )
        return sorted(set(value))


# --------------------------------------------------------------------------------------------
# evaluate

#: The ``evaluate.external_baselines`` value naming the built-in ImageNet testbed
#: (``clipshift.methods.testbed``) instead of a CSV path.
TESTBED = "imagenet-testbed"
#: The testbed's shifts a shift dataset can be matched with (``evaluate.testbed_shifts``).
TestbedShiftName = Literal[
    "imagenet-v2", "imagenet-sketch", "imagenet-r", "objectnet", "imagenet-a"
]


def check_external_baselines(value: str | None) -> str | None:
    """``imagenet-testbed``, or a CSV that exists (remote URIs are checked when read)."""
    if value == TESTBED:
        return value
    try:
        return check_existing_path(value)
    except ValueError as err:
        raise ValueError(f"{err}; external_baselines takes a CSV path or '{TESTBED}'") from None


class EvaluateConfig(StrictModel):
    data_dir: str = Field("data/fetch")
    models_dir: str = Field("models")
    validate_dir: str = Field(
        "data/validate", description="Output of validate; its exclude.json lists dropped samples."
    )
    metrics_path: str = Field("metrics/evaluate.json")
    plots_dir: str = Field("plots/evaluate")
    transform: Literal["logit", "probit"] = Field(
        "logit", description="Axis scaling of the baseline fit (the ImageNet testbed uses logit)."
    )
    external_baselines: str | None = Field(
        None,
        description="CSV of model, id accuracy and one column per shift, joined to baselines; "
        f"or '{TESTBED}': the ImageNet testbed's models trained on ImageNet alone (built in).",
    )
    external_mode: Literal["join", "replace"] = Field("join")
    testbed_shifts: dict[str, TestbedShiftName] = Field(
        default_factory=dict,
        description=f"With external_baselines: {TESTBED}, shift dataset name -> testbed shift; "
        "a shift not listed is matched by its own name (a dataset named imagenet-r, ...).",
    )
    retrieval_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    batch_size: int = Field(256, ge=1, le=65536)
    workers: int = Field(1, ge=0, le=64)
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Ranks: each scores a shard of every dataset (accuracies equal one "
        "process's exactly).",
    )
    register_model: bool = Field(True, description="Register the chosen WiSE-FT model in MLflow.")
    registered_model: str = Field(
        "clipshift-emoji",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="MLflow registry name (clipshift-<task>); the chosen model gets @champion.",
    )
    out_dir: str = Field(
        "data/evaluate",
        description="Per-class correct counts of every model on every eval set "
        "(per_class.json): what the class-level bootstrap resamples.",
    )
    bootstrap: int = Field(
        1000,
        ge=10,
        le=100000,
        description="Class-bootstrap replicates behind every 95 % interval (classes are drawn "
        "with replacement, the same draw for all models and sets).",
    )
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the class draws.")
    baseline_min_chance_multiple: float = Field(
        5.0,
        ge=0,
        description="Baselines with ID accuracy below this multiple of chance (1/classes) are "
        "left out of the line fit: near-chance points tilt a logit line.",
    )

    _external_exists = field_validator("external_baselines")(check_external_baselines)

    @model_validator(mode="after")
    def _testbed_shifts_need_the_testbed(self) -> EvaluateConfig:
        if self.testbed_shifts and self.external_baselines != TESTBED:
            raise ValueError(
                f"testbed_shifts is set but external_baselines is {self.external_baselines!r}; "
                f"set external_baselines: {TESTBED} or remove testbed_shifts"
            )
        return self


# --------------------------------------------------------------------------------------------
# report


class ReportConfig(StrictModel):
    sources: list[str] = Field(
        default_factory=lambda: ["metrics/evaluate.json", "metrics/scaling.json"],
        min_length=1,
        description="Metrics files whose 'findings' are merged (each stage writes its own).",
    )
    findings_path: str = Field(
        "metrics/findings.json", description="Every finding with its criterion and verdict."
    )
    readme: str = Field(
        "README.md", description="`clipshift readme` rewrites its results table between markers."
    )
    other_seeds: list[str] = Field(
        default_factory=lambda: ["metrics/seeds/seed-1.json", "metrics/seeds/seed-2.json"],
        description="Findings of the same study on other seeds (`infra/seed_study.sh SEED` "
        "writes them); the README table shows each beside the main run's, when present.",
    )
    study_html: str = Field(
        "reports/study.html",
        description="The study report: findings, figures and lineage in one self-contained "
        "HTML page (also logged to the pipeline's MLflow run).",
    )
    scatter_dir: str = Field(
        "plots/evaluate/scatter",
        description="evaluate's effective-robustness scatter plots (<evaluate.plots_dir>/scatter).",
    )
    scaling_figures_dir: str = Field(
        "plots/scaling/figures",
        description="scaling's figures (<scaling.plots_dir>/figures).",
    )
    contact_sheet: str = Field(
        "data/fetch/card/contact_sheet.png",
        description="The built-in world's dataset-card contact sheet (<fetch.out_dir>/card/); "
        "the report says so when it is absent (external data has no card).",
    )


# --------------------------------------------------------------------------------------------
# scaling


class ScalingRun(StrictModel):
    width: int = Field(..., ge=8, le=8192)
    layers: int = Field(..., ge=1, le=128)
    samples: int = Field(..., ge=1)


def _default_scaling_grid() -> list[ScalingRun]:
    # The main model's family (clipshift-vit-tiny-p8: patch 8, 32 px, 16-token context, head
    # width 32) at 1/4 and 1/2 width, 1-2 layers, 10k-40k samples: 3e10-9e11 FLOPs, and the
    # default pretrain run (width 128, 4 layers, pretrain.samples: 1.3e13) that the stage adds
    # and reuses (include_pretrain_run). Measured on 2 CPU cores, 1 thread, batch 128:
    # 2000 samples/s at w32-l1, 1650 at w32-l2, 700 at w64-l2: ~85 s of training a pool.
    # Every run of it was on the zero-shot frontier of both pools on the built-in world.
    return [
        ScalingRun(width=32, layers=1, samples=10000),
        ScalingRun(width=32, layers=1, samples=20000),
        ScalingRun(width=32, layers=2, samples=20000),
        ScalingRun(width=64, layers=2, samples=40000),
    ]


class PoolSizeConfig(StrictModel):
    """Fang et al.'s control (b): one model trained on nested subsets of each pool for the
    same number of samples seen, so only the number of distinct pairs changes."""

    fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        description="Fractions of the pool's distinct pairs; nested (each subset holds the "
        "smaller ones). 1.0 is the grid run itself when the run is a grid point (reused).",
    )
    run: ScalingRun | None = Field(
        default_factory=lambda: ScalingRun(width=32, layers=2, samples=20000),
        description="Model (in the main model's family) and samples seen; null: no ablation. "
        "The default is a grid point (its whole-pool run is reused): on 2 CPU cores a subset "
        "run of the main model costs ~270 s, of w64-l2 at 40k samples ~57 s, of this ~12 s.",
    )
    pools: list[str] | None = Field(
        None, description="Pools to ablate; null: every pool of the scaling section."
    )

    @field_validator("fractions")
    @classmethod
    def _in_unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError(f"fractions must lie in (0, 1], got {value}")
        return sorted(set(value))


class ScalingConfig(StrictModel):
    data_dir: str = Field("data/fetch")
    validate_dir: str = Field(
        "data/validate", description="Output of validate: its exclude.json is honoured."
    )
    out_dir: str = Field("models/scaling")
    metrics_path: str = Field("metrics/scaling.json")
    plots_dir: str = Field("plots/scaling")
    pools: list[str] = Field(default_factory=lambda: ["diverse", "narrow"])
    grid: list[ScalingRun] = Field(
        default_factory=_default_scaling_grid,
        description="(width, layers, samples) in the family of pretrain.model: patch size, "
        "image size, context, head width and embed/text-width ratios are the main model's.",
    )
    include_pretrain_run: bool = Field(
        True,
        description="Add the default pretrain run (pretrain.model, pretrain.samples) as a grid "
        "point, reusing models/pretrain/<pool> when its training spec matches.",
    )
    pool_size: PoolSizeConfig = Field(default_factory=PoolSizeConfig)
    baseline_metrics: str | None = Field(
        "metrics/evaluate.json",
        description="evaluate's metrics: its baseline_fit lines give each run's effective "
        "robustness per shift (null or missing file: accuracies only).",
    )
    irreducible: bool = Field(
        False, description="Fit E = A*C^exponent + E_inf instead of a pure power law."
    )
    bootstrap: int = Field(1000, ge=10, le=100000, description="Bootstrap resamples for the CIs.")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="null: pretrain.batch_size (needed for the pretrain run to be a grid point).",
    )
    lr: float | None = Field(None, gt=0, description="null: pretrain.lr (as batch_size).")
    seed: int = Field(
        0, ge=0, description="Bootstrap, probe and subset seed; runs train with pretrain.seed."
    )

    @field_validator("grid")
    @classmethod
    def _enough_runs(cls, value: list[ScalingRun]) -> list[ScalingRun]:
        if len(value) < 3:
            raise ValueError(
                f"a power-law fit with a hold-out needs at least 3 runs, got {len(value)}"
            )
        return value

    def train_batch(self, pretrain: PretrainConfig) -> int:
        return self.batch_size or pretrain.batch_size


# --------------------------------------------------------------------------------------------
# the whole of params.yaml


class PipelineConfig(StrictModel):
    """params.yaml. Every section is required: a stage never runs on class defaults that the
    file does not show. The sections must also agree with each other (where one stage reads
    what another writes, which pools exist, how batches split): :func:`cross_section_problems`.
    """

    fetch: FetchConfig
    validate_: ValidateConfig = Field(alias="validate")  # `validate` is a BaseModel method
    pretrain: PretrainConfig
    supervised: SupervisedConfig
    finetune: FinetuneConfig
    interpolate: InterpolateConfig
    evaluate: EvaluateConfig
    scaling: ScalingConfig
    report: ReportConfig

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def section(self, name: str) -> BaseModel:
        """The section ``name`` as params.yaml spells it (``validate``, not ``validate_``)."""
        if name not in _FIELD_OF:
            raise ConfigError(f"params.yaml has no section '{name}'; it has {list(SECTIONS)}")
        return getattr(self, _FIELD_OF[name])

    def value(self, key: str) -> Any:
        """The setting at dotted ``key`` of params.yaml, e.g. ``"validate.data_dir"``."""
        section, *path = key.split(".")
        value: Any = self.section(section)
        for name in path:
            value = getattr(value, name)
        return value

    @model_validator(mode="after")
    def _sections_agree(self) -> PipelineConfig:
        problems = cross_section_problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


# params.yaml's name of each section → its field (they differ for `validate` only) and model
_FIELD_OF = {f.alias or name: name for name, f in PipelineConfig.model_fields.items()}
SECTIONS: dict[str, type[BaseModel]] = {
    f.alias or name: f.annotation  # type: ignore[misc]  # every field is a section model
    for name, f in PipelineConfig.model_fields.items()
}


# (key of a folder a stage reads, key of the folder an earlier stage writes it to)
READS_WHAT_WRITES = [
    ("validate.data_dir", "fetch.out_dir"),
    ("pretrain.data_dir", "fetch.out_dir"),
    ("finetune.data_dir", "fetch.out_dir"),
    ("finetune.pretrain_dir", "pretrain.out_dir"),
    ("supervised.data_dir", "fetch.out_dir"),
    ("interpolate.data_dir", "fetch.out_dir"),
    ("interpolate.finetune_dir", "finetune.out_dir"),
    ("evaluate.data_dir", "fetch.out_dir"),
    ("evaluate.validate_dir", "validate.out_dir"),
    ("scaling.data_dir", "fetch.out_dir"),
    ("scaling.validate_dir", "validate.out_dir"),
]


# (key of what the study report embeds, key of the folder the drawing stage writes, the path
# under that folder)
REPORT_READS = [
    ("report.scatter_dir", "evaluate.plots_dir", "scatter"),
    ("report.scaling_figures_dir", "scaling.plots_dir", "figures"),
    ("report.contact_sheet", "fetch.out_dir", "card/contact_sheet.png"),
]


def fetched_pools(fetch: FetchConfig) -> set[str]:
    """The pools fetch writes as ``<out_dir>/pool-<name>``: the built-in world's two and every
    source named ``pool-<name>``."""
    pools = set(WORLD_POOLS) if fetch.use_world else set()
    return pools | {
        s.name.removeprefix("pool-") for s in fetch.sources if s.name.startswith("pool-")
    }


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def cross_section_problems(p: PipelineConfig) -> list[str]:
    """What makes the sections disagree, one line per problem naming both keys and the fix;
    each would otherwise fail only when the later stage runs, after the earlier ones."""
    problems = []
    for reader, writer in READS_WHAT_WRITES:
        path, written = p.value(reader), p.value(writer)
        if not _same_path(path, written):
            problems.append(
                f"{reader} = '{path}' but {writer} = '{written}': {reader.split('.')[0]} reads "
                f"what {writer.split('.')[0]} writes; set {reader} to '{written}' (or move both)"
            )
    models = p.evaluate.models_dir
    for key, out in (("finetune.out_dir", p.finetune.out_dir),
                     ("interpolate.out_dir", p.interpolate.out_dir),
                     ("supervised.out_dir", p.supervised.out_dir)):  # fmt: skip
        if not _same_path(os.path.dirname(os.path.normpath(out)) or ".", models):
            problems.append(
                f"{key} = '{out}' is not a folder directly under evaluate.models_dir = '{models}' "
                f"(evaluate reads <models_dir>/*/index.json); set {key} to "
                f"'{os.path.join(models, os.path.basename(os.path.normpath(out)))}' or "
                "evaluate.models_dir to its parent"
            )
    for key, folder, under in REPORT_READS:
        written = os.path.join(p.value(folder), under)
        if not _same_path(p.value(key), written):
            problems.append(
                f"{key} = '{p.value(key)}' but {folder} = '{p.value(folder)}' puts it at "
                f"'{written}', where the report reads it; set {key} to '{written}'"
            )
    for key in ("evaluate.metrics_path", "scaling.metrics_path"):
        if not any(_same_path(p.value(key), src) for src in p.report.sources):
            problems.append(
                f"{key} = '{p.value(key)}' is not in report.sources {p.report.sources}: the "
                f"report merges the findings {key.split('.')[0]} writes; add it to report.sources"
            )
    # pools: finetune adapts a model pretrain trained; pretrain and scaling read fetch's pools
    if p.finetune.pool not in p.pretrain.pools:
        problems.append(
            f"finetune.pool = '{p.finetune.pool}' is not in pretrain.pools {p.pretrain.pools}: "
            "finetune adapts a model that pretrain trains; set finetune.pool to one of them or "
            f"add '{p.finetune.pool}' to pretrain.pools"
        )
    unknown = [pool for pool in p.supervised.pools if pool not in p.pretrain.pools]
    if unknown:
        problems.append(
            f"supervised.pools lists {unknown}, which are not in pretrain.pools "
            f"{p.pretrain.pools}: the supervised control trains at the compute of a CLIP that "
            "pretrain trains on the same pool; remove them or add them to pretrain.pools"
        )
    built = fetched_pools(p.fetch)
    # Without any pool, fetch serves evaluation only (README: 'Evaluating on ImageNet'); the
    # pretraining stages then fail when run, naming the missing pool.
    if built:
        for key, listed in (
            ("pretrain.pools", p.pretrain.pools),
            ("scaling.pools", p.scaling.pools),
        ):
            missing = [pool for pool in listed if pool not in built]
            if missing:
                problems.append(
                    f"{key} lists {missing}, which fetch does not build (fetch.use_world: "
                    f"{str(p.fetch.use_world).lower()}, fetch.sources named pool-<name>: pools "
                    f"{sorted(built)}); remove them from {key} or add a fetch.sources entry "
                    f"named 'pool-{missing[0]}' (role: pool)"
                )
    ev = p.evaluate
    if not p.finetune.baselines and not (ev.external_baselines and ev.external_mode == "replace"):
        problems.append(
            "finetune.baselines is empty, but evaluate fits its baseline line on them: list at "
            "least 3, or set evaluate.external_baselines (e.g. imagenet-testbed) with "
            "external_mode: replace"
        )
    if p.interpolate.soups and not p.finetune.soup_ingredients:
        problems.append(
            f"interpolate.soups = {p.interpolate.soups} but finetune.soup_ingredients is empty: "
            f"a soup needs at least {MIN_SOUP} fine-tunes; list at least {MIN_SOUP - 1} "
            "finetune.soup_ingredients or set interpolate.soups: []"
        )
    # batches: every rank takes equal micro-batches of the global batch
    pre = p.pretrain
    ranks = pre.distributed.world_size
    if pre.batch_size % (pre.accum_steps * ranks):
        problems.append(
            f"pretrain.batch_size = {pre.batch_size} does not split into pretrain.accum_steps "
            f"({pre.accum_steps}) × pretrain.distributed ranks ({ranks} = nproc_per_node × "
            f"nnodes) equal micro-batches; use a batch_size divisible by {pre.accum_steps * ranks}"
        )
    scaling_batch = p.scaling.train_batch(pre)
    if scaling_batch % pre.accum_steps:
        problems.append(
            f"scaling.batch_size = {scaling_batch} does not split into "
            f"pretrain.accum_steps ({pre.accum_steps}) micro-batches (scaling runs take "
            "pretrain's loop settings); make it divisible or change pretrain.accum_steps"
        )
    if 0 < pre.samples < pre.batch_size:  # 0: the starting model recorded, no batch drawn
        problems.append(
            f"pretrain.samples = {pre.samples} is less than one batch (pretrain.batch_size = "
            f"{pre.batch_size}); raise samples or lower batch_size"
        )
    short = [r.samples for r in p.scaling.grid if r.samples < scaling_batch]
    if short:
        problems.append(
            f"scaling.grid has runs of {short} samples, less than one batch (scaling.batch_size"
            f" = {scaling_batch}); raise their samples or lower scaling.batch_size"
        )
    return problems


# keys that moved, so that an older params.yaml is told where they went
MOVED = {
    "nproc_per_node": "distributed.nproc_per_node",
    "nnodes": "distributed.nnodes",
    "soup_lrs": "soup_ingredients (a list of {lr, epochs, augment, label_smoothing})",
}


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: the dotted key, the value given, and what is allowed."""
    section_of = {field: name for name, field in _FIELD_OF.items()}
    lines = []
    for problem in err.errors():
        parts = [str(p) for p in problem["loc"]]
        if parts:
            parts[0] = section_of.get(parts[0], parts[0])
        key = ".".join(parts)
        if problem["type"] == "extra_forbidden" and parts[-1] in MOVED:
            moved = ".".join([*parts[:-1], MOVED[parts[-1]]])
            lines.append(f"'{key}' has moved: it is '{moved}' now")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' (remove it or check its spelling)")
        elif problem["type"] == "missing":
            where = "section" if len(parts) == 1 else "key"
            lines.append(
                f"missing {where} '{key}': params.yaml lists every setting a stage uses (see "
                "the repository's params.yaml)"
            )
        elif not parts:  # a check across sections: its message names the keys
            lines.append(problem["msg"].removeprefix("Value error, "))
        elif isinstance(problem.get("input"), dict):  # a check across a section's keys
            lines.append(f"'{key}': {problem['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{key}' = {problem.get('input')!r}: {problem['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file '{path}' not found; run from the repository root")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"params file '{path}' must hold a mapping at the top level")
    return data


def load_params(path: str | Path = "params.yaml") -> PipelineConfig:
    """Validate the whole file at once, so a typo in any stage fails before the first one runs."""
    try:
        return PipelineConfig.model_validate(load_yaml(path))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
