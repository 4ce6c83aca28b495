"""The scaling stage: pretrain a grid of tiny CLIPs per pool, evaluate each, fit power laws.

For every pool and every (width, layers, samples) of ``ScalingConfig.grid`` a tiny open_clip
ViT (:func:`clipshift.models.tiny_vit_config`, at the world's image size) is pretrained from
scratch with :func:`clipshift.stages.pretrain.run_pretrain`, then evaluated on three tasks:

- ``zeroshot``: top-1 of the prompt-ensemble head on the reference ``test`` split;
- ``retrieval``: recall@5 on the held-out ``retrieval`` pairs, mean of image→text and
  text→image (recall@5 is the retrieval metric of Cherti et al. 2023; recall@1 is recorded
  too);
- ``linear_probe``: a logistic-regression head on frozen features, trained on ``train`` and
  tested on ``test`` (the finetune stage's linear-probe settings).

Error = 1 − accuracy is fitted as E = A·x^exponent (+ E_inf) against training FLOPs, samples seen
and parameters (analytic counts from :mod:`clipshift.flops`), per pool and task, with
:func:`clipshift.methods.scaling_laws.fit_scaling_table`.

Layout, one folder per grid point and pool (the pretrain stage's own layout below it)::

    <out_dir>/<run>/<model-name>.json     architecture (its stem is the open_clip name)
    <out_dir>/<run>/<pool>/checkpoint.pt  + metrics.json, history.json, resume/  (pretrain)
    <out_dir>/<run>/<pool>/training_spec.json  what determined its weights
    <out_dir>/<run>/<pool>/eval.json         its evaluation

A finished run whose training spec (every setting that can change its weights, the pool's
contents included) is identical is reused, and a run cut off mid-training resumes from its
newest resume checkpoint, so a killed stage continues run by run. A run trained with other
settings is moved to ``<pool>/superseded/`` and trained again (:mod:`clipshift.training_spec`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip

from clipshift import flops as flops_count
from clipshift.checkpoints import sidecar_path
from clipshift.classifier import default_device
from clipshift.config import FinetuneConfig, PretrainConfig, ScalingConfig, ScalingRun
from clipshift.data import loaders
from clipshift.data.manifest import task_classes
from clipshift.data.shards import load_info
from clipshift.errors import DataError
from clipshift.io_utils import read_json, write_json_atomic
from clipshift.methods.clip_eval import ClipEvalData, EvalProtocol, evaluate_clip
from clipshift.methods.scaling_laws import fit_scaling_table, predict
from clipshift.models import (
    load_pretrained,
    resolve_model_config,
    tiny_vit_config,
    tiny_vit_name,
)
from clipshift.plots import DPI, plot_scaling
from clipshift.stages.pretrain import choose_loader, pool_path, run_pretrain
from clipshift.tracking_api import NullTracker, Tracker
from clipshift.training_spec import canonical

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "linear_probe")
#: The wide-row column each task's fit reads (an accuracy or a recall in [0, 1]).
TASK_METRIC = {
    "zeroshot": "zeroshot_accuracy",
    "retrieval": "retrieval_recall_5",
    "linear_probe": "linear_probe_accuracy",
}
X_KEYS = ("flops", "samples", "params")
CSV_COLUMNS = (
    "pool",
    "width",
    "layers",
    "samples",
    "params",
    "flops",
    "zeroshot_error",
    "retrieval_error",
    "linear_probe_error",
)
EVAL_FILE = "eval.json"
#: Bump when the evaluation protocol changes, so stored eval.json files are recomputed.
#: 2: eval.json holds no timing (models/scaling is a DVC output); eval_seconds is in the row.
EVAL_VERSION = 2
# --------------------------------------------------------------------------------------------
# names and paths


def run_name(point: ScalingRun) -> str:
    return f"w{point.width}-l{point.layers}-s{point.samples}"


def run_dir(cfg: ScalingConfig, pool: str, point: ScalingRun) -> Path:
    """Where run_pretrain writes this run: ``<out_dir>/<run>/<pool>``."""
    return Path(cfg.out_dir) / run_name(point) / pool


def world_image_size(data_dir: str | Path, pools: Sequence[str]) -> int:
    """The side the world's images are stored at: the models are built for it.

    The reference ``test`` split decides (every evaluation happens at that size), then the
    pools; external data without a declared size falls back to 32 px.
    """
    for name in ["test", *(f"pool-{p}" for p in pools)]:
        path = Path(data_dir) / name
        size = load_info(path).image_size if (path / "dataset.json").exists() else None
        if size:
            return int(size)
    log.warning("no image_size in %s/*/dataset.json; building 32 px models", data_dir)
    return 32


def write_model_config(cfg: ScalingConfig, point: ScalingRun, image_size: int) -> Path:
    """The run's architecture as JSON; its file stem is the name open_clip registers."""
    config = tiny_vit_config(point.width, point.layers, image_size=image_size)
    path = (
        Path(cfg.out_dir)
        / run_name(point)
        / f"{tiny_vit_name(point.width, point.layers, image_size)}.json"
    )
    if not path.exists() or read_json(path) != config:
        write_json_atomic(path, config)
    return path


def pretrain_config(
    cfg: ScalingConfig, pretrain: PretrainConfig, pool: str, point: ScalingRun, model_path: Path
) -> PretrainConfig:
    """The pretrain settings of one run: the pretrain section's optimiser and loop knobs, the
    scaling section's data, batch, LR and seed, from scratch, written under ``cfg.out_dir``."""
    update = {
        "model": str(model_path),
        "samples": point.samples,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "data_dir": cfg.data_dir,
        "out_dir": str(Path(cfg.out_dir) / run_name(point)),
        "pools": [pool],
        "init_checkpoint": None,  # a scaling run is trained from scratch by definition
    }
    # model_validate (not model_copy) so the derived settings are checked like params.yaml.
    return PretrainConfig.model_validate({**pretrain.model_dump(), **update})


# --------------------------------------------------------------------------------------------
# what every run shares: the evaluation data and the decoded pools, read once per stage


def load_eval_data(cfg: ScalingConfig) -> ClipEvalData:
    """The reference task's train/test splits and the retrieval pairs, minus validate's
    exclusions."""
    data = Path(cfg.data_dir)

    def labelled(name: str) -> loaders.LabelledData:
        return loaders.load_labelled(data / name, loaders.read_exclude(cfg.validate_dir, name))

    train, test = labelled("train"), labelled("test")
    classes = task_classes(data, test.classes)
    top = int(max(train.labels.max(), test.labels.max()))
    if top >= len(classes):
        raise DataError(
            f"labels go up to {top} but the task has {len(classes)} classes; re-run fetch"
        )
    pairs = loaders.load_captioned(
        data / "retrieval", exclude=loaders.read_exclude(cfg.validate_dir, "retrieval")
    )
    return ClipEvalData(classes, train, test, pairs.images, pairs.captions)


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


# --------------------------------------------------------------------------------------------
# one grid point: train (or reuse), evaluate (or reuse)


@dataclass
class GridInputs:
    """What every run of the grid shares, read once per stage."""

    data: ClipEvalData
    protocol: EvalProtocol
    pools: DecodedPools
    image_size: int


def eval_protocol(finetune: FinetuneConfig) -> EvalProtocol:
    """The finetune section's prompt templates and linear-probe settings."""
    return EvalProtocol(
        templates=tuple(finetune.templates),
        probe_steps=finetune.linear_epochs,
        probe_lr=finetune.linear_lr,
        probe_weight_decay=finetune.linear_weight_decay,
    )


def grid_inputs(cfg: ScalingConfig, finetune: FinetuneConfig) -> GridInputs:
    return GridInputs(
        data=load_eval_data(cfg),
        protocol=eval_protocol(finetune),
        pools=DecodedPools(cfg.data_dir),
        image_size=world_image_size(cfg.data_dir, cfg.pools),
    )


def train_and_evaluate(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: ScalingRun,
    inputs: GridInputs,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain (or reuse) and evaluate (or reuse) one grid point on one pool; its table row."""
    tracker = tracker or NullTracker()
    model_path = write_model_config(cfg, point, inputs.image_size)
    pcfg = pretrain_config(cfg, pretrain, pool, point, model_path)
    rdir = run_dir(cfg, pool, point)
    name = f"scaling-{pool}-{run_name(point)}"
    tags = {"clipshift.pool": pool, "clipshift.scaling_run": run_name(point)}
    with tracker.child(name, tags) as child:
        child.log_params(
            {
                "width": point.width,
                "layers": point.layers,
                "pool": pool,
                "samples": point.samples,
                "model": model_path.stem,
            }
        )
        # run_pretrain reuses a finished run only on an identical training spec, resumes a
        # cut-off one, and sets aside work trained with other settings (clipshift.training_spec)
        memory = choose_loader(pcfg, pool_path(pcfg, pool), inputs.image_size) == "memory"
        pool_data = inputs.pools.get(pool, model_path, inputs.image_size) if memory else None
        train = run_pretrain(pcfg, pool, tracker=child, progress=progress, pool_data=pool_data)
        reused = bool(train.get("reused"))
        child.set_tags({"clipshift.reused": str(reused).lower()})
        row = _row(pool, point, read_json(model_path), train, reused)
        row.update(_evaluation(rdir, inputs, cfg.seed))
        child.log_metrics(_numbers(row))
    tracker.log_metrics({f"{k}/{pool}/{run_name(point)}": v for k, v in _numbers(row).items()})
    return row


def _evaluation(rdir: Path, inputs: GridInputs, seed: int) -> dict[str, Any]:
    """eval.json if it belongs to this checkpoint and protocol, else a fresh evaluation."""
    ckpt = rdir / "checkpoint.pt"
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
    path = rdir / EVAL_FILE
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
        "flops": flops_count.training_flops(model_config, seen),
        "train_seconds": train.get("train_time_s"),
        "final_loss": train.get("final_loss_avg") or train.get("final_loss"),
        "reused": reused,
    }


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    skip = {"width", "layers", "reused"}
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


# --------------------------------------------------------------------------------------------
# fits, tables, figures


def long_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, task) with an ``accuracy`` column: what fit_scaling_table groups."""
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
    """metrics/scaling.json: ``{"fits": {<task>/<pool>/vs_<x>: {...}}, "runs": [wide rows]}``."""
    fits: dict[str, Any] = {}
    long = long_table(rows)
    for task in TASKS:  # one call per task (the grouping also splits by pool)
        table = fit_scaling_table(
            [r for r in long if r["task"] == task],
            y_key="accuracy",
            x_keys=X_KEYS,
            group_by=("pool", "task"),
            irreducible=cfg.irreducible,
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
        )
        fits.update(table["fits"])
    return {"fits": fits, "runs": [dict(r) for r in rows]}


def write_runs_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One line per run with errors (DVC plots: x=flops, y=zeroshot_error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            line = {k: r[k] for k in CSV_COLUMNS if k in r}
            for task in TASKS:
                line[f"{task}_error"] = round(1.0 - float(r[TASK_METRIC[task]]), 6)
            writer.writerow(line)
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
    cfg: ScalingConfig, metrics: Mapping[str, Any], x_key: str = "flops"
) -> list[Path]:
    """One law per task × pool (plots.plot_scaling) and one pool comparison per task."""
    out = Path(cfg.plots_dir) / "figures"
    runs, fits, paths = metrics["runs"], metrics["fits"], []
    for task in TASKS:
        for pool in cfg.pools:
            fit = fits.get(f"{task}/{pool}/vs_{x_key}")
            if fit is None:
                continue
            path = out / f"{task}-{pool}-vs_{x_key}.png"
            paths.append(
                plot_scaling(
                    runs,
                    fit,
                    x_key,
                    TASK_METRIC[task],
                    path,
                    bootstrap=cfg.bootstrap,
                    seed=cfg.seed,
                )
            )
        compared = {p: fits[f"{task}/{p}/vs_{x_key}"] for p in cfg.pools
                    if f"{task}/{p}/vs_{x_key}" in fits}  # fmt: skip
        if len(compared) > 1:
            paths.append(
                plot_pool_comparison(
                    runs, compared, task, x_key, out / f"{task}-pools-vs_{x_key}.png"
                )
            )
    return paths


def plot_pool_comparison(
    runs: Sequence[Mapping[str, Any]],
    fits: Mapping[str, Mapping[str, Any]],
    task: str,
    x_key: str,
    path: str | Path,
) -> Path:
    """Every pool's runs (colour: pool, marker: model size) and fitted law on log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs_all = [float(r[x_key]) for r in runs]
    grid = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 3, 200)
    sizes = sorted({(r["width"], r["layers"]) for r in runs})
    markers = dict(zip(sizes, ["o", "s", "^", "D", "v", "P", "X"] * len(sizes), strict=False))
    for i, (pool, fit) in enumerate(sorted(fits.items())):
        colour = colours[i % len(colours)]
        label = f"{pool}: exponent {fit['exponent']:.3f} {_ci_text(fit)}, R² = {fit['r2']:.2f}"
        ax.plot(grid, predict(fit, grid), color=colour, lw=1.6, label=label)
        for r in runs:
            if r["pool"] == pool:
                y = 1.0 - float(r[TASK_METRIC[task]])
                marker = markers[r["width"], r["layers"]]
                ax.scatter(float(r[x_key]), y, color=colour, marker=marker, s=34, zorder=5)
    for (width, layers), marker in markers.items():  # legend entries for the model sizes
        ax.scatter([], [], color="0.4", marker=marker, label=f"width {width}, {layers} layer(s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel({"flops": "training compute (FLOPs)"}.get(x_key, x_key))
    ax.set_ylabel(f"{task} error (1 − {TASK_METRIC[task]})")
    ax.set_title(f"Scaling of {task} error: pools compared")
    ax.grid(True, which="both", color="0.92")
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def summarize(
    cfg: ScalingConfig,
    rows: Sequence[Mapping[str, Any]],
    tracker: Tracker | None = None,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Fits, runs.csv, figures and the pool comparison from the finished runs' rows.

    Returns ``{"metrics": <metrics/scaling.json content>, "comparison", "figures",
    "runs_csv"}``; writes ``cfg.metrics_path`` only if ``write_metrics`` (a flow that
    publishes the metrics itself passes False, so the file is written once).
    """
    tracker = tracker or NullTracker()
    metrics = fit_runs(cfg, rows)
    csv_path = write_runs_csv(Path(cfg.plots_dir) / "runs.csv", metrics["runs"])
    figures = plot_figures(cfg, metrics)
    if write_metrics:
        write_json_atomic(cfg.metrics_path, metrics)
    for path in [csv_path, *figures]:
        tracker.log_artifact(path, "scaling")
    return {
        "metrics": metrics,
        "comparison": comparison_table(metrics["fits"], cfg.pools),
        "figures": [str(p) for p in figures],
        "runs_csv": str(csv_path),
    }


# --------------------------------------------------------------------------------------------
# the stage


def grid_points(cfg: ScalingConfig) -> list[tuple[str, ScalingRun]]:
    """(pool, grid point) in training order: pool by pool, cheapest run first, so a stage
    stopped early leaves complete small runs behind. A point listed twice is trained once."""
    unique = {(p.width, p.layers, p.samples): p for p in cfg.grid}
    order = [unique[key] for key in sorted(unique)]
    return [(pool, point) for pool in cfg.pools for point in order]


def run_scaling(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    finetune: FinetuneConfig,
    tracker: Tracker | None = None,
    progress: bool = True,
    write_metrics: bool = True,
    run_point: Callable[..., dict[str, Any]] = train_and_evaluate,
) -> dict[str, Any]:
    """Train and evaluate the whole grid on every pool, fit the laws, write every output.

    Every run takes the pretrain section's loop settings and is scored with the finetune
    section's templates and linear-probe settings. ``run_point`` trains one grid point (with
    :func:`train_and_evaluate`'s arguments): the flow passes a Prefect task wrapping it, so each
    run is a task with its own state and retries. Returns ``{"fits", "runs", "comparison",
    "figures", "runs_csv", "wall_seconds"}``; ``fits`` and ``runs`` are what
    ``cfg.metrics_path`` holds.
    """
    tracker = tracker or NullTracker()
    start = time.perf_counter()
    inputs = grid_inputs(cfg, finetune)
    rows = [
        run_point(cfg, pretrain, pool, point, inputs, tracker, progress)
        for pool, point in grid_points(cfg)
    ]
    summary = summarize(cfg, rows, tracker, write_metrics)
    wall = round(time.perf_counter() - start, 2)
    tracker.log_metrics({"scaling_wall_seconds": wall})
    return {**summary.pop("metrics"), **summary, "wall_seconds": wall}
