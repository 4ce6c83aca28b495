"""The scaling stage: pretrain a grid of CLIPs per pool, evaluate each, fit power laws.

The grid lives in the family of the main model (``pretrain.model``): :func:`family_config`
changes only the towers' width and depth, keeping patch size, image size, context length,
head widths and the embed/text-width ratios. The default pretrain run (``pretrain.model`` at
``pretrain.samples``) is a grid point (``include_pretrain_run``) and is *reused*, not
retrained: its checkpoint in ``<pretrain.out_dir>/<pool>`` is evaluated when its training
spec is the one the grid would train (:func:`reuse_pretrain_run`). Every run trains with the
pretrain section's settings (batch, LR and seed included unless ``scaling.batch_size``/``lr``
override them), and is evaluated on

- ``zeroshot``: top-1 of the prompt-ensemble head on the reference ``test`` split, and on every
  shift set (``zeroshot_shift_accuracy``) with its effective robustness against evaluate's
  baseline lines (``baseline_metrics``: Fang et al.'s control (c), ER vs scale);
- ``retrieval``: recall@5 on the held-out ``retrieval`` pairs, mean of image→text and
  text→image (recall@5 is the retrieval metric of Cherti et al. 2023; recall@1 is recorded
  too);
- ``linear_probe``: a logistic-regression head on frozen features, trained on ``train`` and
  tested on ``test`` (the finetune stage's linear-probe settings).

Error = 1 − accuracy is fitted as E = A·C^exponent (+ E_inf) on the compute-Pareto frontier
(Cherti et al. 2023), per pool and task (``fits``). The zero-shot fit's R² carries a
class-level bootstrap interval (``r2_class_ci95``): each replicate redraws the task's classes,
recomputes every run's test error from its per-class counts, re-finds the frontier and refits,
as every accuracy of the study is bootstrapped (:mod:`clipshift.methods.bootstrap`). Fits on
every run against FLOPs, samples and non-embedding parameters are kept as the secondary view
(``fits_all_runs``). FLOPs and parameters are analytic counts (:mod:`clipshift.flops`);
``params_non_embedding`` leaves out the text token-embedding table.

A pool-size ablation (Fang et al.'s control (b), ``pool_size``) trains one family model on
nested subsets of each pool for the same number of samples seen.

Layout, one folder per grid point and pool (the pretrain stage's own layout below it)::

    <out_dir>/<run>/<model-name>.json     architecture (its stem is the open_clip name)
    <out_dir>/<run>/<pool>/checkpoint.pt  + metrics.json, history.json, resume/  (pretrain)
    <out_dir>/<run>/<pool>/training_spec.json  what determined its weights
    <out_dir>/<run>/<pool>/eval.json         its evaluation (the only file for a reused
                                             pretrain run)
    <out_dir>/<run>-f<fraction>/<pool>/      a pool-size ablation run on a subset

A finished run whose training spec (every setting that can change its weights, the pool's
contents included) is identical is reused, and a run cut off mid-training resumes from its
newest resume checkpoint, so a killed stage continues run by run. A run trained with other
settings is moved to ``<pool>/superseded/`` and trained again (:mod:`clipshift.training_spec`).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip

from clipshift import flops as flops_count
from clipshift.checkpoints import sidecar_path
from clipshift.classifier import default_device
from clipshift.config import FinetuneConfig, PretrainConfig, ScalingConfig, ScalingRun
from clipshift.data import loaders
from clipshift.data.manifest import task_classes
from clipshift.data.shards import load_info
from clipshift.errors import ConfigError, DataError
from clipshift.io_utils import read_json, write_json_atomic
from clipshift.methods import bootstrap
from clipshift.methods.clip_eval import ClipEvalData, EvalProtocol, evaluate_clip
from clipshift.methods.robustness import BaselineFit, effective_robustness
from clipshift.methods.scaling_laws import (
    MIN_CI_POINTS,
    fit_frontier_table,
    fit_scaling_table,
    predict,
    replicate_frontier_r2,
)
from clipshift.models import load_pretrained, resolve_model_config
from clipshift.parallel import Run, run_side_by_side, worker_count
from clipshift.plots import DPI, plot_scaling
from clipshift.stages.pretrain import Pretrainer, choose_loader, pool_path, run_pretrain
from clipshift.tracking_api import NullTracker, RecordingTracker, Tracker, replay
from clipshift.training_spec import canonical, describe_changes, read_spec

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "linear_probe")
#: The wide-row column each task's fit reads (an accuracy or a recall in [0, 1]).
TASK_METRIC = {
    "zeroshot": "zeroshot_accuracy",
    "retrieval": "retrieval_recall_5",
    "linear_probe": "linear_probe_accuracy",
}
#: The frontier is drawn in compute (Cherti et al.); the all-runs fits use every size axis.
FRONTIER_X = "flops"
X_KEYS = ("flops", "samples", "params_non_embedding")
CSV_COLUMNS = (
    "pool",
    "run",
    "width",
    "layers",
    "samples",
    "params",
    "params_non_embedding",
    "flops",
    "on_frontier",
    "zeroshot_error",
    "retrieval_error",
    "linear_probe_error",
    "ood_accuracy_avg",
    "effective_robustness_avg",
)
EVAL_FILE = "eval.json"
ID_DATASET = "test"  # the reference task's set every run is scored on
RETRIEVAL_DATASET = "retrieval"
#: Bump when the evaluation protocol changes, so stored eval.json files are recomputed.
#: 2: eval.json holds no timing (models/scaling is a DVC output); eval_seconds is in the row.
#: 3: zero-shot accuracy on every shift set.
#: 4: per-class zero-shot counts on test (``zeroshot_per_class``), for the class bootstrap.
EVAL_VERSION = 4
#: The per-class counts in a run's row: the bootstrap's input, kept out of the metrics files.
PER_CLASS_KEY = "zeroshot_per_class"
# --------------------------------------------------------------------------------------------
# the main model's family, names and paths


def main_model(pretrain: PretrainConfig) -> tuple[str, dict[str, Any]]:
    """(name, config) of the pretrain section's model: the family the grid belongs to."""
    name, config = resolve_model_config(pretrain.model)
    flops_count.count_params(config)  # refuses what the analytic counts do not model
    return name, copy.deepcopy(config)


def family_config(base: Mapping[str, Any], width: int, layers: int) -> dict[str, Any]:
    """``base`` at vision width ``width`` and depth ``layers``: patch and image size, context,
    vocabulary and head widths stay; text width and depth and embed_dim keep their ratio to
    the vision tower's. ``family_config(base, its width, its layers) == base``."""
    cfg = copy.deepcopy(dict(base))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    base_width, base_layers = int(vision["width"]), int(vision["layers"])
    head_width = int(vision.get("head_width", 64))
    text_head = int(text["width"]) // int(text.get("heads", 8))
    if width % head_width:
        raise ConfigError(
            f"scaling.grid width {width} is not a multiple of the family's vision head width "
            f"{head_width}; choose widths divisible by it"
        )
    text_width = round(width * int(text["width"]) / base_width)
    text["width"] = text_width
    text["heads"] = max(1, text_width // text_head)
    text["layers"] = max(1, round(layers * int(text["layers"]) / base_layers))
    vision["width"], vision["layers"] = width, layers
    cfg["embed_dim"] = round(width * int(cfg["embed_dim"]) / base_width)
    return cfg


def includes_pretrain_run(cfg: ScalingConfig, pretrain: PretrainConfig) -> bool:
    """The pretrain run is a grid point when asked for and trained (samples: 0 records
    published weights, no point of this family's grid)."""
    return cfg.include_pretrain_run and pretrain.samples > 0


def main_point(pretrain: PretrainConfig) -> ScalingRun:
    """The default pretrain run as a grid point."""
    vision = main_model(pretrain)[1]["vision_cfg"]
    return ScalingRun(width=vision["width"], layers=vision["layers"], samples=pretrain.samples)


def point_checkpoint(
    cfg: ScalingConfig, pool: str, point: ScalingRun, fraction: float, row: Mapping[str, Any]
) -> Path:
    """The checkpoint a grid row was scored from: its own run's, or the reused pretrain run's."""
    home = (
        Path(row["reused_from"]) if row.get("reused_from") else run_dir(cfg, pool, point, fraction)
    )
    return home / "checkpoint.pt"


def run_name(point: ScalingRun, fraction: float = 1.0) -> str:
    base = f"w{point.width}-l{point.layers}-s{point.samples}"
    return base if fraction >= 1.0 else f"{base}-f{fraction:g}"


def run_dir(cfg: ScalingConfig, pool: str, point: ScalingRun, fraction: float = 1.0) -> Path:
    """Where run_pretrain writes this run: ``<out_dir>/<run>/<pool>``."""
    return Path(cfg.out_dir) / run_name(point, fraction) / pool


def write_model_config(
    cfg: ScalingConfig, point: ScalingRun, family: tuple[str, dict[str, Any]], fraction: float = 1.0
) -> Path:
    """The run's architecture as JSON; its file stem is the name open_clip registers."""
    base_name, base = family
    config = family_config(base, point.width, point.layers)
    name = f"{base_name}-w{point.width}-l{point.layers}"
    path = Path(cfg.out_dir) / run_name(point, fraction) / f"{name}.json"
    if not path.exists() or read_json(path) != config:
        write_json_atomic(path, config)
    return path


def pretrain_config(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    model_path: Path,
    fraction: float = 1.0,
) -> PretrainConfig:
    """The pretrain settings of one run: the pretrain section's (seed included), at the
    point's model and samples, the scaling section's data, from scratch, under out_dir."""
    update = {
        "model": str(model_path),
        "samples": point.samples,
        "batch_size": cfg.train_batch(pretrain),
        "lr": cfg.lr or pretrain.lr,
        "data_dir": cfg.data_dir,
        "out_dir": str(Path(cfg.out_dir) / run_name(point, fraction)),
        "pools": [pool],
        "init_checkpoint": None,  # a scaling run is trained from scratch by definition
        "pretrained": None,
    }
    # model_validate (not model_copy) so the derived settings are checked like params.yaml.
    return PretrainConfig.model_validate({**pretrain.model_dump(), **update})


# --------------------------------------------------------------------------------------------
# what every run shares: the evaluation data and the decoded pools, read once per stage


def shift_names(data_dir: str | Path) -> list[str]:
    """Shift sets (role ``shift``) over the whole label space; a set covering a subset of
    the classes (``extra.class_subset``) is left out, as a full-space zero-shot head would
    not score it the way evaluate does."""
    names = []
    for info_file in sorted(Path(data_dir).glob("*/dataset.json")):
        info = load_info(info_file.parent)
        if info.role != "shift":
            continue
        if info.extra.get("class_subset"):
            log.info("scaling: %s covers part of the classes; not scored", info.name)
            continue
        names.append(info_file.parent.name)
    return names


def load_eval_data(cfg: ScalingConfig) -> ClipEvalData:
    """The reference task's train/test splits, the shift sets and the retrieval pairs, minus
    validate's exclusions."""
    data = Path(cfg.data_dir)

    def labelled(name: str) -> loaders.LabelledData:
        return loaders.load_labelled(data / name, loaders.read_exclude(cfg.validate_dir, name))

    train, test = labelled("train"), labelled(ID_DATASET)
    classes = task_classes(data, test.classes)
    shifts = {name: labelled(name) for name in shift_names(data)}
    top = max(int(d.labels.max()) for d in [train, test, *shifts.values()] if len(d.labels))
    if top >= len(classes):
        raise DataError(
            f"labels go up to {top} but the task has {len(classes)} classes; re-run fetch"
        )
    pairs = loaders.load_captioned(
        data / RETRIEVAL_DATASET,
        exclude=loaders.read_exclude(cfg.validate_dir, RETRIEVAL_DATASET),
    )
    return ClipEvalData(classes, train, test, pairs.images, pairs.captions, shifts)


def load_baseline(path: str | None, shifts: Sequence[str]) -> dict[str, BaselineFit]:
    """evaluate's baseline line per shift (``baseline_fit`` of metrics/evaluate.json), for the
    shifts scored here; {} when the file is absent (accuracies are recorded without ER)."""
    if not path or not Path(path).exists():
        log.warning("scaling: no baseline lines (%s missing); recording no ER", path)
        return {}
    lines = read_json(path).get("baseline_fit") or {}
    return {
        name: BaselineFit(
            slope=float(line["slope"]),
            intercept=float(line["intercept"]),
            r2=float(line.get("r2", float("nan"))),
            transform=str(line.get("transform", "logit")),
            n=int(line.get("n", 0)),
        )
        for name, line in lines.items()
        if name in shifts and isinstance(line, Mapping) and "slope" in line
    }


class DecodedPools:
    """Each pool decoded once for the whole grid and handed to run_pretrain.

    Decoding costs ~5 CPU-seconds a pool on the built-in world, a fifth of the stage's budget
    over 12 runs. The tokens depend on the tokenizer and its context length, the images on
    the size: the cache key holds all three, so a grid model that differs gets its own copy.
    Training never modifies a PoolTensors (batches are gathered copies).
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._cache: dict[tuple, loaders.PoolTensors] = {}

    def get(self, pool: str, model_path: Path, image_size: int) -> loaders.PoolTensors:
        name, config = resolve_model_config(str(model_path))
        context = config["text_cfg"].get("context_length")
        key = (pool, image_size, context, config["text_cfg"].get("hf_tokenizer_name"))
        if key not in self._cache:
            tokenizer = open_clip.get_tokenizer(name)
            self._cache[key] = loaders.load_pool(
                self.data_dir / f"pool-{pool}", tokenizer, image_size
            )
        return self._cache[key]


def subset_pool(
    data: loaders.PoolTensors, fraction: float, seed: int
) -> tuple[loaders.PoolTensors, dict[str, Any]]:
    """The first ``fraction`` of a seeded permutation of the pool's distinct pairs (by key), so
    subsets of one seed are nested; and its record for the training spec."""
    keys = sorted(set(data.keys))
    order = np.random.default_rng(seed).permutation(len(keys))
    count = max(1, round(fraction * len(keys)))
    chosen = {keys[i] for i in order[:count]}
    index = [i for i, k in enumerate(data.keys) if k in chosen]
    index = list({data.keys[i]: i for i in index}.values())  # one copy of a repeated key
    picked = [data.keys[i] for i in index]
    sub = loaders.PoolTensors(data.images[index], data.tokens[index], picked, data.stats)
    digest = hashlib.sha256("\n".join(sorted(picked)).encode()).hexdigest()[:16]
    record = {"fraction": fraction, "pairs": len(picked), "seed": seed, "keys_sha256": digest}
    return sub, record


# --------------------------------------------------------------------------------------------
# one grid point: train (or reuse), evaluate (or reuse)


@dataclass
class GridInputs:
    """What every run of the grid shares, read once per stage."""

    data: ClipEvalData
    protocol: EvalProtocol
    pools: DecodedPools
    image_size: int
    family: tuple[str, dict[str, Any]]
    baseline: dict[str, BaselineFit] = field(default_factory=dict)


def eval_protocol(finetune: FinetuneConfig) -> EvalProtocol:
    """The finetune section's prompt templates and linear-probe settings."""
    return EvalProtocol(
        templates=tuple(finetune.templates),
        probe_steps=finetune.linear_epochs,
        probe_lr=finetune.linear_lr,
        probe_weight_decay=finetune.linear_weight_decay,
    )


def grid_inputs(
    cfg: ScalingConfig, finetune: FinetuneConfig, pretrain: PretrainConfig
) -> GridInputs:
    family = main_model(pretrain)
    data = load_eval_data(cfg)
    return GridInputs(
        data=data,
        protocol=eval_protocol(finetune),
        pools=DecodedPools(cfg.data_dir),
        image_size=int(family[1]["vision_cfg"]["image_size"]),
        family=family,
        baseline=load_baseline(cfg.baseline_metrics, list(data.shifts)),
    )


def reuse_pretrain_run(
    pretrain: PretrainConfig, pcfg: PretrainConfig, pool: str
) -> dict[str, Any] | None:
    """The pretrain stage's finished run on ``pool`` if it is exactly this grid point (same
    training fingerprint, so the same weights), else None with a log line saying why.

    Read only: the pretrain stage's folder is its own DVC output. Building the trainer to get
    the spec writes nothing (claiming the folder happens in ``run``)."""
    rdir = Path(pretrain.out_dir) / pool
    ckpt, metrics_file = rdir / "checkpoint.pt", rdir / "metrics.json"
    if not (ckpt.exists() and metrics_file.exists()):
        log.warning("scaling: no finished pretrain run in %s; training the point here", rdir)
        return None
    trainer = Pretrainer(pcfg, pool, NullTracker(), False, None)
    stored = read_json(metrics_file)
    if stored.get("training_fingerprint") != trainer.fingerprint:
        log.warning(
            "scaling: %s was trained otherwise than this grid point (%s); training it here",
            rdir,
            describe_changes(read_spec(rdir), trainer.spec),
        )
        return None
    log.info("scaling %s: reusing the pretrain stage's run %s", pool, rdir)
    return {**stored, "reused": True, "train_time_s": None, "checkpoint": str(ckpt)}


def training_plan(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    fraction: float,
    inputs: GridInputs,
    progress: bool,
) -> Run | dict[str, Any]:
    """How to get the point's model: the run_pretrain call to make (on the point, or on a
    subset of the pool), or the reused pretrain run's result."""
    model_path = write_model_config(cfg, point, inputs.family, fraction)
    pcfg = pretrain_config(cfg, pretrain, pool, point, model_path, fraction)
    if includes_pretrain_run(cfg, pretrain) and fraction >= 1.0 and point == main_point(pretrain):
        reused = reuse_pretrain_run(pretrain, pcfg, pool)
        if reused is not None:
            return {**reused, "reused_from": str(Path(pretrain.out_dir) / pool)}
    memory = choose_loader(pcfg, pool_path(pcfg, pool), inputs.image_size) == "memory"
    pool_data = inputs.pools.get(pool, model_path, inputs.image_size) if memory else None
    extra = None
    if fraction < 1.0:
        if pool_data is None:
            raise ConfigError(
                f"the pool-size ablation subsets pool '{pool}' in memory, but it is too large "
                "for the in-memory loader; set scaling.pool_size.run to null"
            )
        pool_data, subset = subset_pool(pool_data, fraction, cfg.seed)
        extra = {"scaling.pool_subset": subset}
    # run_pretrain reuses a finished run only on an identical training spec, resumes a
    # cut-off one, and sets aside work trained with other settings (clipshift.training_spec)
    kwargs = {"cfg": pcfg, "pool": pool, "progress": progress, "pool_data": pool_data}
    return Run(run_pretrain, {**kwargs, "spec_extra": extra})


Trained = tuple[dict[str, Any], RecordingTracker]  # a run's result and what it logged


def train_side_by_side(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    points: Sequence[tuple[str, ScalingRun, float]],
    inputs: GridInputs,
    progress: bool,
) -> list[Trained | None]:
    """Train the (pool, point, fraction) runs side by side on a CPU, one core each
    (:mod:`clipshift.parallel`); what each logged is kept for its point's MLflow run. None
    for a point left to its task: the reused pretrain run, or every point with one worker
    (each then trains in its own task, logging as it goes)."""
    trained: list[Trained | None] = [None] * len(points)
    if worker_count(len(points), default_device()) <= 1:
        return trained  # one worker: no plan here, each task plans and trains its own point
    plans = [training_plan(cfg, pretrain, *point, inputs, progress) for point in points]
    first = {run_dir(cfg, *point): i for i, point in reversed(list(enumerate(points)))}
    # a point listed twice (the ablation's full pool is a grid point) trains once; its task
    # then finds the finished run and reuses it
    todo = [i for i in sorted(first.values()) if isinstance(plans[i], Run)]
    workers = worker_count(len(todo), default_device())
    if workers <= 1:
        return trained
    runs = [cast(Run, plans[i]) for i in todo]
    for i, run in zip(todo, runs, strict=True):
        point = points[i][1]
        run.tracker = RecordingTracker()
        run.cost = point.width**2 * point.layers * point.samples  # ~ training FLOPs
    for i, run, result in zip(todo, runs, run_side_by_side(runs, workers), strict=True):
        trained[i] = (result, cast(RecordingTracker, run.tracker))
    return trained


def _train(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    fraction: float,
    inputs: GridInputs,
    tracker: Tracker,
    progress: bool,
    trained: Trained | None,
) -> dict[str, Any]:
    """The point's run: trained side by side already (its log replayed into ``tracker``),
    trained here, or the reused pretrain run."""
    if trained is not None:
        result, recorded = trained
        replay(recorded.dump(), tracker)
        return result
    plan = training_plan(cfg, pretrain, pool, point, fraction, inputs, progress)
    if isinstance(plan, Run):
        return plan.entry(**plan.kwargs, tracker=tracker)
    return plan


def train_and_evaluate(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    inputs: GridInputs,
    tracker: Tracker | None = None,
    progress: bool = True,
    fraction: float = 1.0,
    trained: Trained | None = None,
) -> dict[str, Any]:
    """Pretrain (or reuse) and evaluate (or reuse) one grid point on one pool (on the first
    ``fraction`` of its pairs for the pool-size ablation); its table row. ``trained``: the
    point's run, already trained by :func:`train_side_by_side`."""
    tracker = tracker or NullTracker()
    name = run_name(point, fraction)
    tags = {"clipshift.pool": pool, "clipshift.scaling_run": name}
    with tracker.child(f"scaling-{pool}-{name}", tags) as child:
        child.log_params(
            {"width": point.width, "layers": point.layers, "pool": pool,
             "samples": point.samples, "fraction": fraction}
        )  # fmt: skip
        train = _train(cfg, pretrain, pool, point, fraction, inputs, child, progress, trained)
        reused = bool(train.get("reused"))
        child.set_tags({"clipshift.reused": str(reused).lower()})
        ckpt = Path(train["checkpoint"])
        # the architecture trained: a reused pretrain run matched this point's spec, so its too
        arch = family_config(inputs.family[1], point.width, point.layers)
        row = _row(pool, point, arch, train, reused)
        # distinct pairs trained on (pretrain counts the pool it was handed, subset or whole)
        row.update({"run": name, "fraction": fraction, "pool_pairs": train.get("pool_samples")})
        row.update(
            _evaluation(ckpt, run_dir(cfg, pool, point, fraction) / EVAL_FILE, inputs, cfg.seed)
        )
        row.update(robustness(row, inputs.baseline))
        child.log_metrics(_numbers(row))
    tracker.log_metrics({f"{k}/{pool}/{name}": v for k, v in _numbers(row).items()})
    return row


def robustness(row: Mapping[str, Any], baseline: Mapping[str, BaselineFit]) -> dict[str, Any]:
    """ER per shift against evaluate's lines at the run's own ID accuracy, and their mean."""
    shift_acc = row.get("zeroshot_shift_accuracy") or {}
    out: dict[str, Any] = {}
    if shift_acc:
        out["ood_accuracy_avg"] = float(np.mean(list(shift_acc.values())))
    er = {
        s: float(effective_robustness(baseline[s], row["zeroshot_accuracy"], acc))
        for s, acc in shift_acc.items()
        if s in baseline
    }
    if er:
        out["effective_robustness"] = er
        out["effective_robustness_avg"] = float(np.mean(list(er.values())))
    return out


def _evaluation(ckpt: Path, path: Path, inputs: GridInputs, seed: int) -> dict[str, Any]:
    """eval.json if it belongs to this checkpoint and protocol, else a fresh evaluation."""
    key = {
        "version": EVAL_VERSION,
        "checkpoint_sha256": sidecar_path(ckpt).read_text().split()[0]
        if sidecar_path(ckpt).exists()
        else str(ckpt.stat().st_mtime_ns),
        "classes": inputs.data.classes,
        "protocol": asdict(inputs.protocol),
        "seed": seed,
        "samples": inputs.data.fingerprint(),
    }
    if path.exists():
        stored = read_json(path)
        if stored.get("key") == canonical(key):
            return stored["metrics"]
    start = time.perf_counter()
    device = default_device()
    metrics = evaluate_clip(
        load_pretrained(ckpt, device), inputs.data, inputs.protocol, seed, device
    )
    write_json_atomic(path, {"key": key, "metrics": metrics})
    return {**metrics, "eval_seconds": round(time.perf_counter() - start, 2)}


def _row(
    pool: str, point: ScalingRun, model_config: dict, train: Mapping[str, Any], reused: bool
) -> dict[str, Any]:
    # FLOPs and samples count what was trained: samples rounds down to whole batches.
    seen = int(train.get("samples") or point.samples)
    return {
        "pool": pool,
        "run": run_name(point),
        "width": point.width,
        "layers": point.layers,
        "samples": seen,
        "samples_requested": point.samples,
        "params": flops_count.count_params(model_config),
        "params_non_embedding": flops_count.count_params_non_embedding(model_config),
        "flops": flops_count.training_flops(model_config, seen),
        "train_seconds": train.get("train_time_s"),
        "final_loss": train.get("final_loss_avg") or train.get("final_loss"),
        "reused": reused,
        "reused_from": train.get("reused_from"),
    }


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    skip = {"width", "layers", "reused", "fraction"}
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


# --------------------------------------------------------------------------------------------
# fits, findings, tables, figures


def long_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, task) with an ``accuracy`` column: what the fits group."""
    return [
        {
            "pool": r["pool"],
            "task": task,
            "run": r["run"],
            **{k: r[k] for k in X_KEYS},
            "accuracy": float(r[TASK_METRIC[task]]),
        }
        for r in rows
        for task in TASKS
    ]


def fit_runs(cfg: ScalingConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"fits": {<task>/<pool>/vs_flops: frontier fit}, "fits_all_runs": {<task>/<pool>/
    vs_<x>: fit on every run}, "runs": [wide rows, each with on_frontier]}``."""
    frontier: dict[str, Any] = {}
    everything: dict[str, Any] = {}
    long = long_table(rows)
    for task in TASKS:  # one call per task (the grouping also splits by pool)
        runs = [r for r in long if r["task"] == task]
        frontier.update(
            fit_frontier_table(
                runs, "accuracy", FRONTIER_X, ("pool", "task"), "run",
                cfg.irreducible, cfg.bootstrap, cfg.seed,
            )
        )  # fmt: skip
        table = fit_scaling_table(
            runs,
            y_key="accuracy",
            x_keys=X_KEYS,
            group_by=("pool", "task"),
            irreducible=cfg.irreducible,
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
        )
        everything.update(table["fits"])
    on_front = {
        (fit["pool"], run)
        for name, fit in frontier.items()
        if fit["task"] == "zeroshot"
        for run in fit["frontier_runs"]
    }
    for fit in frontier.values():
        if fit["task"] == "zeroshot":
            pool_rows = [r for r in rows if r["pool"] == fit["pool"]]
            fit["r2_class_ci95"] = zeroshot_r2_class_ci(pool_rows, cfg.bootstrap, cfg.seed)
    wide = [{**without_counts(r), "on_frontier": (r["pool"], r["run"]) in on_front} for r in rows]
    return {"fits": frontier, "fits_all_runs": everything, "runs": wide}


def without_counts(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as the metrics files hold it: no per-class counts."""
    return {k: v for k, v in row.items() if k != PER_CLASS_KEY}


def zeroshot_r2_class_ci(
    rows: Sequence[Mapping[str, Any]], replicates: int, seed: int
) -> list[float] | None:
    """95 % class-bootstrap interval of one pool's zero-shot frontier R² (error vs FLOPs).

    None when a run lacks per-class counts (an evaluation older than :data:`EVAL_VERSION` 4)
    or ``replicates`` is 0. Every run is resampled with the same class draw (paired), so the
    frontier and the fit see one consistent alternative test set per replicate.
    """
    if replicates <= 0 or not rows or any(PER_CLASS_KEY not in r for r in rows):
        return None
    counts = bootstrap.PerClassCounts(
        models=[str(r["run"]) for r in rows],
        datasets=[ID_DATASET],
        correct=np.array([[r[PER_CLASS_KEY]["correct"]] for r in rows], dtype=np.int64),
        total=np.array([rows[0][PER_CLASS_KEY]["total"]], dtype=np.int64),
    )
    weights = bootstrap.class_weights(counts.num_classes, replicates, seed)
    errors = 1.0 - bootstrap.resampled_accuracy(counts, weights)[:, :, 0]  # (B, runs)
    flops = np.array([float(r[FRONTIER_X]) for r in rows])
    r2 = replicate_frontier_r2(flops, np.clip(errors, 1e-6, None))
    r2 = r2[np.isfinite(r2)]
    return bootstrap.ci95(r2) if r2.size >= 10 else None


def findings(fits: Mapping[str, Any], pools: Sequence[str]) -> dict[str, Any]:
    """``scaling_power_law_<pool>``: the zero-shot frontier fit's R² with its class-bootstrap
    CI (the CI over frontier points beside it, when there are enough points), its hold-out
    error and the frontier runs. The report stage judges it."""
    out: dict[str, Any] = {}
    for pool in pools:
        fit = fits.get(f"zeroshot/{pool}/vs_{FRONTIER_X}")
        if fit is None:
            continue
        entry = {
            "statement": (
                f"Zero-shot error of CLIPs pretrained on the {pool} pool follows a power law "
                f"in training compute on the compute-Pareto frontier (E = {fit['A']:.3g}·"
                f"C^{fit['exponent']:.3f}, {fit['n']} of {fit['n_runs']} runs on the frontier)."
            ),
            "value": fit["r2"],
            "ci95": fit.get("r2_class_ci95"),
            "ci95_method": "class bootstrap: resample classes, recompute every run's error, "
            "re-find the frontier, refit",
            "r2_ci95_over_points": fit["r2_ci95"],
            "holdout_rel_error": fit["holdout_rel_error"],
            "exponent": fit["exponent"],
            "exponent_ci95": (fit.get("ci95") or {}).get("exponent"),
            "frontier_runs": list(fit["frontier_runs"]),
        }
        if fit["r2_ci95"] is None:
            entry["r2_ci95_over_points_note"] = (
                f"{fit['n']} frontier points: a bootstrap over points needs at least "
                f"{MIN_CI_POINTS} to resample more than a handful of distinct sets"
            )
        out[f"scaling_power_law_{pool}"] = entry
    return out


def _flat_shifts(row: Mapping[str, Any]) -> dict[str, Any]:
    """acc_<shift> and er_<shift> columns of one row."""
    out = {f"acc_{s}": a for s, a in (row.get("zeroshot_shift_accuracy") or {}).items()}
    out.update({f"er_{s}": e for s, e in (row.get("effective_robustness") or {}).items()})
    return out


def write_runs_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One line per run with errors, shift accuracies and ERs (DVC plots: x=flops,
    y=zeroshot_error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in _flat_shifts(r)}, key=lambda k: (k[:3], k))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*CSV_COLUMNS, *extra])
        writer.writeheader()
        for r in rows:
            line = {k: r[k] for k in CSV_COLUMNS if k in r}
            for task in TASKS:
                line[f"{task}_error"] = round(1.0 - float(r[TASK_METRIC[task]]), 6)
            writer.writerow({**line, **_flat_shifts(r)})
    tmp.replace(path)
    return path


def write_pool_size_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """The pool-size ablation, one line per (pool, fraction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("pool", "run", "fraction", "pool_pairs", "samples", "zeroshot_accuracy",
            "ood_accuracy_avg", "effective_robustness_avg")  # fmt: skip
    extra = sorted({k for r in rows for k in _flat_shifts(r)}, key=lambda k: (k[:3], k))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*keys, *extra])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r.get(k) for k in keys}, **_flat_shifts(r)})
    tmp.replace(path)
    return path


def _ci_text(fit: Mapping[str, Any]) -> str:
    ci = (fit.get("ci95") or {}).get("exponent")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def comparison_table(
    fits: Mapping[str, Any], pools: Sequence[str], x_key: str = "flops"
) -> list[dict[str, Any]]:
    """Per task: each pool's exponent with its 95 % CI, R² and hold-out error."""
    rows = []
    for task in TASKS:
        row: dict[str, Any] = {"task": task, "x": x_key}
        intervals = []
        for pool in pools:
            fit = fits.get(f"{task}/{pool}/vs_{x_key}")
            if fit is None:
                continue
            row[f"exponent_{pool}"] = round(fit["exponent"], 4)
            row[f"exponent_ci95_{pool}"] = _ci_text(fit)
            row[f"r2_{pool}"] = round(fit["r2"], 3)
            hold = fit.get("holdout_rel_error")
            row[f"holdout_rel_error_{pool}"] = None if hold is None else round(hold, 4)
            if (fit.get("ci95") or {}).get("exponent"):
                intervals.append(fit["ci95"]["exponent"])
        if len(pools) == 2:  # do the two exponents differ? (None: a CI is unknown)
            row["exponent_ci_overlap"] = None
            if len(intervals) == 2:
                (a_lo, a_hi), (b_lo, b_hi) = intervals
                row["exponent_ci_overlap"] = bool(a_lo <= b_hi and b_lo <= a_hi)
        rows.append(row)
    return rows


def plot_figures(
    cfg: ScalingConfig, metrics: Mapping[str, Any], x_key: str = FRONTIER_X
) -> list[Path]:
    """Per task × pool the frontier law (plots.plot_scaling on the frontier runs), one pool
    comparison per task (every run), ER vs compute, and the pool-size ablation."""
    out = Path(cfg.plots_dir) / "figures"
    runs, fits, paths = metrics["runs"], metrics["fits"], []
    for task in TASKS:
        for pool in cfg.pools:
            fit = fits.get(f"{task}/{pool}/vs_{x_key}")
            if fit is None:
                continue
            front = [r for r in runs if r["pool"] == pool and r["run"] in fit["frontier_runs"]]
            path = out / f"{task}-{pool}-vs_{x_key}.png"
            paths.append(
                plot_scaling(
                    front, fit, x_key, TASK_METRIC[task], path,
                    bootstrap=cfg.bootstrap, seed=cfg.seed,
                )
            )  # fmt: skip
        compared = {p: fits[f"{task}/{p}/vs_{x_key}"] for p in cfg.pools
                    if f"{task}/{p}/vs_{x_key}" in fits}  # fmt: skip
        if len(compared) > 1:
            paths.append(
                plot_pool_comparison(
                    runs, compared, task, x_key, out / f"{task}-pools-vs_{x_key}.png"
                )
            )
    if any("effective_robustness_avg" in r for r in runs):
        paths.append(plot_er_vs_compute(runs, cfg.pools, out / "er-vs_flops.png"))
    if metrics.get("pool_size"):
        paths.append(plot_pool_size(metrics["pool_size"], out / "pool_size.png"))
    return paths


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.8))


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def plot_pool_comparison(
    runs: Sequence[Mapping[str, Any]],
    fits: Mapping[str, Mapping[str, Any]],
    task: str,
    x_key: str,
    path: str | Path,
) -> Path:
    """Every pool's runs (colour: pool, marker: model size; filled: on the frontier) and
    fitted frontier law on log-log axes."""
    fig, ax = _axes()
    xs_all = [float(r[x_key]) for r in runs]
    grid = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 3, 200)
    sizes = sorted({(r["width"], r["layers"]) for r in runs})
    markers = dict(zip(sizes, ["o", "s", "^", "D", "v", "P", "X"] * len(sizes), strict=False))
    for i, (pool, fit) in enumerate(sorted(fits.items())):
        colour = COLOURS[i % len(COLOURS)]
        label = f"{pool}: exponent {fit['exponent']:.3f} {_ci_text(fit)}, R² = {fit['r2']:.2f}"
        ax.plot(grid, predict(fit, grid), color=colour, lw=1.6, label=label)
        for r in runs:
            if r["pool"] == pool:
                y = 1.0 - float(r[TASK_METRIC[task]])
                front = r["run"] in fit.get("frontier_runs", ())
                ax.scatter(
                    float(r[x_key]), y, marker=markers[r["width"], r["layers"]], s=34, zorder=5,
                    color=colour if front else "none", edgecolors=colour,
                )  # fmt: skip
    for (width, layers), marker in markers.items():  # legend entries for the model sizes
        ax.scatter([], [], color="0.4", marker=marker, label=f"width {width}, {layers} layer(s)")
    ax.scatter([], [], color="none", edgecolors="0.4", label="off the frontier (hollow)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel({"flops": "training compute (FLOPs)"}.get(x_key, x_key))
    ax.set_ylabel(f"{task} error (1 − {TASK_METRIC[task]})")
    ax.set_title(f"Scaling of {task} error: pools compared, frontier fits")
    ax.grid(True, which="both", color="0.92")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_er_vs_compute(
    runs: Sequence[Mapping[str, Any]], pools: Sequence[str], path: str | Path
) -> Path:
    """Mean effective robustness over shifts of every run against its training compute."""
    fig, ax = _axes()
    for i, pool in enumerate(pools):
        mine = sorted(
            (r for r in runs if r["pool"] == pool and "effective_robustness_avg" in r),
            key=lambda r: r["flops"],
        )
        ax.plot(
            [r["flops"] for r in mine], [r["effective_robustness_avg"] for r in mine],
            "o-", color=COLOURS[i % len(COLOURS)], label=pool, lw=1.2,
        )  # fmt: skip
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("effective robustness (mean over shifts)")
    ax.set_title("Effective robustness vs scale (zero-shot, evaluate's baseline lines)")
    ax.grid(True, which="both", color="0.92")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pool_size(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """ID zero-shot accuracy (solid) and mean ER (dashed) against distinct pairs, per pool."""
    fig, ax = _axes()
    for i, pool in enumerate(sorted({r["pool"] for r in rows})):
        mine = sorted((r for r in rows if r["pool"] == pool), key=lambda r: r["fraction"])
        colour, pairs = COLOURS[i % len(COLOURS)], [r["pool_pairs"] for r in mine]
        ax.plot(pairs, [r["zeroshot_accuracy"] for r in mine], "o-", color=colour,
                label=f"{pool}: ID zero-shot")  # fmt: skip
        if all("effective_robustness_avg" in r for r in mine):
            ax.plot(pairs, [r["effective_robustness_avg"] for r in mine], "s--", color=colour,
                    label=f"{pool}: mean ER")  # fmt: skip
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("distinct pairs in the pool (same samples seen)")
    ax.set_ylabel("accuracy / effective robustness")
    ax.set_title("Pool-size ablation at equal compute")
    ax.grid(True, which="both", color="0.92")
    ax.legend(fontsize=8)
    return _save(fig, path)


def summarize(
    cfg: ScalingConfig,
    rows: Sequence[Mapping[str, Any]],
    tracker: Tracker | None = None,
    write_metrics: bool = True,
    pool_size: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Fits, findings, runs.csv, figures and the pool comparison from the finished runs' rows.

    Returns ``{"metrics": <metrics/scaling.json content>, "comparison", "figures",
    "runs_csv"}``; writes ``cfg.metrics_path`` only if ``write_metrics`` (a flow that
    publishes the metrics itself passes False, so the file is written once).
    """
    tracker = tracker or NullTracker()
    metrics = fit_runs(cfg, rows)
    metrics["pool_size"] = [without_counts(r) for r in pool_size]
    metrics["findings"] = findings(metrics["fits"], cfg.pools)
    csv_path = write_runs_csv(Path(cfg.plots_dir) / "runs.csv", metrics["runs"])
    files = [csv_path]
    if pool_size:
        files.append(write_pool_size_csv(Path(cfg.plots_dir) / "pool_size.csv", pool_size))
    figures = plot_figures(cfg, metrics)
    if write_metrics:
        write_json_atomic(cfg.metrics_path, metrics)
    for path in [*files, *figures]:
        tracker.log_artifact(path, "scaling")
    return {
        "metrics": metrics,
        "comparison": comparison_table(metrics["fits"], cfg.pools),
        "figures": [str(p) for p in figures],
        "runs_csv": str(csv_path),
    }


# --------------------------------------------------------------------------------------------
# the stage


def grid_points(
    cfg: ScalingConfig, pretrain: PretrainConfig | None = None
) -> list[tuple[str, ScalingRun]]:
    """(pool, grid point) in training order: pool by pool, cheapest run first, so a stage
    stopped early leaves complete small runs behind. A point listed twice is trained once.
    With ``pretrain`` and ``include_pretrain_run``, the default pretrain run is a point."""
    points = list(cfg.grid)
    if pretrain is not None and includes_pretrain_run(cfg, pretrain):
        points.append(main_point(pretrain))
    unique = {(p.width, p.layers, p.samples): p for p in points}
    order = [unique[key] for key in sorted(unique)]
    return [(pool, point) for pool in cfg.pools for point in order]


def pool_size_points(cfg: ScalingConfig) -> list[tuple[str, float]]:
    """(pool, fraction) of the pool-size ablation, smallest subset first."""
    ablation = cfg.pool_size
    if ablation.run is None:
        return []
    pools = ablation.pools or cfg.pools
    unknown = [p for p in pools if p not in cfg.pools]
    if unknown:
        raise ConfigError(
            f"scaling.pool_size.pools lists {unknown}, not among scaling.pools {cfg.pools}"
        )
    return [(pool, f) for pool in pools for f in ablation.fractions]


def run_scaling(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    finetune: FinetuneConfig,
    tracker: Tracker | None = None,
    progress: bool = True,
    write_metrics: bool = True,
    run_point: Callable[..., dict[str, Any]] = train_and_evaluate,
) -> dict[str, Any]:
    """Train and evaluate the whole grid on every pool, then the pool-size ablation; fit the
    laws, write every output.

    Every run takes the pretrain section's settings and is scored with the finetune
    section's templates and linear-probe settings. ``run_point`` trains one grid point (with
    :func:`train_and_evaluate`'s arguments): the flow passes a Prefect task wrapping it, so each
    run is a task with its own state and retries. Returns ``{"fits", "fits_all_runs", "runs",
    "pool_size", "findings", "comparison", "figures", "runs_csv", "wall_seconds"}``; the
    first five are what ``cfg.metrics_path`` holds.
    """
    tracker = tracker or NullTracker()
    start = time.perf_counter()
    inputs = grid_inputs(cfg, finetune, pretrain)
    grid = [(pool, point, 1.0) for pool, point in grid_points(cfg, pretrain)]
    sizes = [(pool, cfg.pool_size.run, f) for pool, f in pool_size_points(cfg)]
    ablation_points = cast(list[tuple[str, ScalingRun, float]], sizes)
    trained = train_side_by_side(cfg, pretrain, grid + ablation_points, inputs, progress)
    rows = [
        run_point(cfg, pretrain, pool, point, inputs, tracker, progress, fraction, done)
        for (pool, point, fraction), done in zip(grid + ablation_points, trained, strict=True)
    ]
    rows, ablation = rows[: len(grid)], rows[len(grid) :]
    summary = summarize(cfg, rows, tracker, write_metrics, ablation)
    wall = round(time.perf_counter() - start, 2)
    tracker.log_metrics({"scaling_wall_seconds": wall})
    return {**summary.pop("metrics"), **summary, "wall_seconds": wall}
