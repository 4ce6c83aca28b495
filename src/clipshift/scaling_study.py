"""The scaling stage: pretrain a grid of tiny CLIPs per pool, evaluate each, fit power laws.

For every pool and every (width, layers, samples) of ``ScalingConfig.grid`` a tiny open_clip
ViT (:func:`clipshift.models.tiny_vit_config`, at the world's image size) is pretrained from
scratch with :func:`clipshift.pretrain.run_pretrain`, then evaluated on three tasks:

- ``zeroshot``: top-1 of the prompt-ensemble head on the reference ``test`` split;
- ``retrieval``: recall@5 on the held-out ``retrieval`` pairs, mean of image→text and
  text→image (recall@5 is the retrieval metric of Cherti et al. 2023; recall@1 is recorded
  too);
- ``linear_probe``: a logistic-regression head on frozen features, trained on ``train`` and
  tested on ``test`` (the finetune stage's linear-probe settings).

Error = 1 − accuracy is fitted as E = A·x^alpha (+ E_inf) against training FLOPs, samples seen
and parameters (analytic counts from :mod:`clipshift.flops`), per pool and task, with
:func:`clipshift.scaling.fit_scaling_table`.

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

import contextlib
import csv
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipshift import flops as flops_count
from clipshift.config import DEFAULT_TEMPLATES, FinetuneConfig, PretrainConfig, ScalingConfig
from clipshift.config import ScalingRun as GridPoint
from clipshift.data import loaders
from clipshift.data.shards import load_info
from clipshift.errors import DataError
from clipshift.io_utils import read_json, write_json_atomic
from clipshift.scaling import fit_scaling_table
from clipshift.tracking_api import NullTracker, Tracker

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
EVAL_VERSION = 1
FEATURE_BATCH = 256


# --------------------------------------------------------------------------------------------
# names and paths


def run_name(point: GridPoint) -> str:
    return f"w{point.width}-l{point.layers}-s{point.samples}"


def run_dir(cfg: ScalingConfig, pool: str, point: GridPoint) -> Path:
    """Where run_pretrain writes this run: ``<out_dir>/<run>/<pool>``."""
    return Path(cfg.out_dir) / run_name(point) / pool


def world_image_size(data_dir: str | Path, pools: Sequence[str]) -> int:
    """The side the world's images are stored at: the models are built for it.

    The reference ``test`` split decides (every evaluation happens at that size), then the
    pools; external data without a declared size falls back to 32 px.
    """
    for name in ["test", *(f"pool-{p}" for p in pools)]:
        path = Path(data_dir) / name
        if (path / "dataset.json").exists() and load_info(path).image_size:
            return int(load_info(path).image_size)
    log.warning("no image_size in %s/*/dataset.json; building 32 px models", data_dir)
    return 32


def write_model_config(cfg: ScalingConfig, point: GridPoint, image_size: int) -> Path:
    """The run's architecture as JSON; its file stem is the name open_clip registers."""
    from clipshift.models import tiny_vit_config, tiny_vit_name

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
    cfg: ScalingConfig, pretrain: PretrainConfig, pool: str, point: GridPoint, model_path: Path
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
# evaluation data (decoded once per stage)


@dataclass
class EvalData:
    classes: list[str]
    train: loaders.LabelledData
    test: loaders.LabelledData
    retrieval_images: torch.Tensor  # uint8 N×3×H×W, resized to the model by retrieval_recall
    retrieval_captions: list[str]

    def fingerprint(self) -> str:
        """Identifies the evaluation samples (which keys survived the exclusions)."""
        text = "\n".join([*self.train.keys, "|", *self.test.keys, "|", *self.retrieval_captions])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_classes(data_dir: str | Path, fallback: Sequence[str] | None) -> list[str]:
    """Class names of the reference task: the manifest's, else the test split's."""
    path = Path(data_dir) / "manifest.json"
    if path.exists():
        classes = (read_json(path).get("task") or {}).get("classes")
        if classes:
            return list(classes)
    if fallback:
        return list(fallback)
    raise DataError(
        f"no class names in {path} nor in {data_dir}/test/dataset.json; re-run `dvc repro fetch`"
    )


def load_eval_data(cfg: ScalingConfig) -> EvalData:
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
    from clipshift.evaluate import load_captioned

    images, captions = load_captioned(
        data / "retrieval", loaders.read_exclude(cfg.validate_dir, "retrieval")
    )
    return EvalData(classes, train, test, images, captions)


# --------------------------------------------------------------------------------------------
# evaluating one pretrained CLIP


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == torch.as_tensor(labels)).float().mean())


def retrieval_recalls(bundle: Any, data: EvalData, device: torch.device) -> dict[str, float]:
    """Recall@1 and @5 on the retrieval pairs, each the mean of image→text and text→image."""
    from clipshift.evaluate import retrieval_recall

    recall = retrieval_recall(
        bundle.model, bundle.tokenizer, data.retrieval_images, data.retrieval_captions,
        ks=(1, 5), batch_size=FEATURE_BATCH, device=device,
    )  # fmt: skip
    return {
        f"retrieval_recall_{k}": 0.5 * (recall[f"image_to_text@{k}"] + recall[f"text_to_image@{k}"])
        for k in (1, 5)
    }


def evaluate_clip(checkpoint: str | Path, data: EvalData, seed: int = 0) -> dict[str, float]:
    """Zero-shot top-1, linear-probe top-1 (train → test) and retrieval recalls of a CLIP."""
    from clipshift.classifier import default_device, extract_features
    from clipshift.finetune import load_pretrained, train_linear_probe, zeroshot_classifier

    device = default_device()
    bundle = load_pretrained(checkpoint, device)
    zs = zeroshot_classifier(bundle, data.classes, DEFAULT_TEMPLATES)
    # One feature pass per split serves both the zero-shot head and the probe.
    f_train = extract_features(zs.visual, data.train.images, FEATURE_BATCH, None, device)
    f_test = extract_features(zs.visual, data.test.images, FEATURE_BATCH, None, device)
    with torch.inference_mode():
        zs_logits = zs.head(zs.prepare(f_test.to(device))).cpu()
    probe_cfg = FinetuneConfig()  # the finetune stage's linear-probe protocol, fixed here
    head, _ = train_linear_probe(
        f_train,
        data.train.labels,
        num_classes=len(data.classes),
        weight_decays=(probe_cfg.linear_weight_decay,),
        steps=probe_cfg.linear_epochs,
        lr=probe_cfg.linear_lr,
        seed=seed,
    )
    with torch.inference_mode():
        probe_logits = head(F.normalize(f_test.float(), dim=-1))
    return {
        "zeroshot_accuracy": _top1(zs_logits, data.test.labels),
        "linear_probe_accuracy": _top1(probe_logits, data.test.labels),
        **retrieval_recalls(bundle, data, device),
    }


# --------------------------------------------------------------------------------------------
# pools decoded once per stage, not once per run


@contextlib.contextmanager
def shared_pools() -> Iterator[None]:
    """Let every run of the grid share one decoded copy of each pool.

    run_pretrain decodes its pool with ``loaders.load_pool`` at the start of every run; on the
    built-in world that is ~5 CPU-seconds a run, a fifth of the stage's budget over 12 runs.
    Inside this context the function is memoised by (pool, image size, tokenizer kind and
    context length, excluded keys) — the tokens only depend on those, the images on the size.
    Nothing in a PoolTensors is modified by training (batches are gathered copies).
    TODO(lead): replace by a pool argument or cache in run_pretrain itself.
    """
    original = loaders.load_pool
    cache: dict[tuple, loaders.PoolTensors] = {}

    def load_pool(dataset_dir, tokenizer, image_size, exclude=None):  # noqa: ANN001, ANN202
        key = (
            str(Path(dataset_dir).resolve()),
            int(image_size),
            type(tokenizer).__name__,
            getattr(tokenizer, "context_length", None),
            frozenset(exclude or ()),
        )
        if key not in cache:
            cache[key] = original(dataset_dir, tokenizer, image_size, exclude)
        return cache[key]

    loaders.load_pool = load_pool
    try:
        yield
    finally:
        loaders.load_pool = original


# --------------------------------------------------------------------------------------------
# one grid point: train (or reuse), evaluate (or reuse)


def _supports_child_runs(tracker: Tracker) -> bool:
    try:
        from clipshift.tracking import MlflowTracker
    except ImportError:
        return False
    return isinstance(tracker, MlflowTracker)


@contextlib.contextmanager
def run_tracker(tracker: Tracker, name: str, tags: dict[str, str]) -> Iterator[Tracker]:
    """An MLflow child run per trained model when the tracker has runs; else nothing is
    logged per step (the stage tracker still gets every run's summary)."""
    if _supports_child_runs(tracker):
        from clipshift.tracking import child_run

        with child_run(tracker, name, tags) as child:
            yield child
    else:
        yield NullTracker()


def train_and_evaluate(
    cfg: ScalingConfig,
    pretrain: PretrainConfig,
    pool: str,
    point: GridPoint,
    data: EvalData,
    tracker: Tracker | None = None,
    progress: bool = True,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Pretrain (or reuse) and evaluate (or reuse) one grid point on one pool; its table row."""
    from clipshift.pretrain import run_pretrain

    tracker = tracker or NullTracker()
    image_size = image_size or world_image_size(cfg.data_dir, [pool])
    model_path = write_model_config(cfg, point, image_size)
    pcfg = pretrain_config(cfg, pretrain, pool, point, model_path)
    rdir = run_dir(cfg, pool, point)
    name = f"scaling-{pool}-{run_name(point)}"
    tags = {"clipshift.pool": pool, "clipshift.scaling_run": run_name(point)}
    with run_tracker(tracker, name, tags) as child:
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
        train = run_pretrain(pcfg, pool, tracker=child, progress=progress)
        reused = bool(train.get("reused"))
        child.set_tags({"clipshift.reused": str(reused).lower()})
        row = _row(pool, point, read_json(model_path), train, reused)
        row.update(_evaluation(rdir, data, cfg.seed))
        child.log_metrics(_numbers(row))
    tracker.log_metrics({f"{k}/{pool}/{run_name(point)}": v for k, v in _numbers(row).items()})
    return row


def _evaluation(rdir: Path, data: EvalData, seed: int) -> dict[str, Any]:
    """eval.json if it belongs to this checkpoint and protocol, else a fresh evaluation."""
    from clipshift.checkpoints import sidecar_path

    ckpt = rdir / "checkpoint.pt"
    key = {
        "version": EVAL_VERSION,
        "checkpoint_sha256": sidecar_path(ckpt).read_text().split()[0]
        if sidecar_path(ckpt).exists()
        else str(ckpt.stat().st_mtime_ns),
        "classes": data.classes,
        "seed": seed,
        "samples": data.fingerprint(),
    }
    path = rdir / EVAL_FILE
    if path.exists():
        stored = read_json(path)
        if stored.get("key") == key:
            return stored["metrics"]
    start = time.perf_counter()
    metrics = evaluate_clip(ckpt, data, seed)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    write_json_atomic(path, {"key": key, "metrics": metrics})
    return metrics


def _row(
    pool: str, point: GridPoint, model_config: dict, train: Mapping[str, Any], reused: bool
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
    ci = (fit.get("ci95") or {}).get("alpha")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def comparison_table(
    fits: Mapping[str, Any], pools: Sequence[str], x_key: str = "flops"
) -> list[dict[str, Any]]:
    """Per task: each pool's exponent alpha with its 95 % CI, R² and hold-out error."""
    rows = []
    for task in TASKS:
        row: dict[str, Any] = {"task": task, "x": x_key}
        intervals = []
        for pool in pools:
            fit = fits.get(f"{task}/{pool}/vs_{x_key}")
            if fit is None:
                continue
            row[f"alpha_{pool}"] = round(fit["alpha"], 4)
            row[f"alpha_ci95_{pool}"] = _ci_text(fit)
            row[f"r2_{pool}"] = round(fit["r2"], 3)
            hold = fit.get("holdout_rel_error")
            row[f"holdout_rel_error_{pool}"] = None if hold is None else round(hold, 4)
            if (fit.get("ci95") or {}).get("alpha"):
                intervals.append(fit["ci95"]["alpha"])
        if len(pools) == 2:  # do the two exponents differ? (None: a CI is unknown)
            row["alpha_ci_overlap"] = None
            if len(intervals) == 2:
                (a_lo, a_hi), (b_lo, b_hi) = intervals
                row["alpha_ci_overlap"] = bool(a_lo <= b_hi and b_lo <= a_hi)
        rows.append(row)
    return rows


def plot_figures(
    cfg: ScalingConfig, metrics: Mapping[str, Any], x_key: str = "flops"
) -> list[Path]:
    """One law per task × pool (plots.plot_scaling) and one pool comparison per task."""
    from clipshift.plots import plot_scaling

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

    from clipshift.plots import DPI
    from clipshift.scaling import predict

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs_all = [float(r[x_key]) for r in runs]
    grid = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 3, 200)
    sizes = sorted({(r["width"], r["layers"]) for r in runs})
    markers = dict(zip(sizes, ["o", "s", "^", "D", "v", "P", "X"] * len(sizes), strict=False))
    for i, (pool, fit) in enumerate(sorted(fits.items())):
        colour = colours[i % len(colours)]
        label = f"{pool}: α = {fit['alpha']:.3f} {_ci_text(fit)}, R² = {fit['r2']:.2f}"
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


def grid_points(cfg: ScalingConfig) -> list[tuple[str, GridPoint]]:
    """(pool, grid point) in training order: pool by pool, cheapest run first, so a stage
    stopped early leaves complete small runs behind. A point listed twice is trained once."""
    unique = {(p.width, p.layers, p.samples): p for p in cfg.grid}
    order = [unique[key] for key in sorted(unique)]
    return [(pool, point) for pool in cfg.pools for point in order]


def run_scaling(
    cfg: ScalingConfig,
    pretrain: PretrainConfig | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the whole grid on every pool, fit the laws, write every output.

    Returns ``{"fits", "runs", "comparison", "figures", "runs_csv", "wall_seconds"}``;
    ``fits`` and ``runs`` are what ``cfg.metrics_path`` holds.
    """
    tracker = tracker or NullTracker()
    pretrain = pretrain or PretrainConfig()
    start = time.perf_counter()
    data = load_eval_data(cfg)
    size = world_image_size(cfg.data_dir, cfg.pools)
    with shared_pools():
        rows = [
            train_and_evaluate(cfg, pretrain, pool, point, data, tracker, progress, size)
            for pool, point in grid_points(cfg)
        ]
    summary = summarize(cfg, rows, tracker, write_metrics)
    wall = round(time.perf_counter() - start, 2)
    tracker.log_metrics({"scaling_wall_seconds": wall})
    return {**summary.pop("metrics"), **summary, "wall_seconds": wall}
