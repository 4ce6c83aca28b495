"""The fetch stage: the built-in world and external sources into one manifest.

Every dataset lands in ``<out_dir>/<name>/`` (dataset.json + webdataset shards); the manifest
lists them with counts, class lists and shard hashes. Datasets of sources that are no longer
configured are removed, so the manifest always describes exactly what is on disk.

``<out_dir>`` is a DVC output, so it is a pure function of the configuration and the sources:
nothing in it records how long fetch took or what an earlier run left behind. Those facts
(``fetch_seconds``, ``world_build_seconds``, ``removed_stale``) come back with the manifest
from :func:`run_fetch` and go to ``metrics/fetch.json`` and MLflow (:func:`fetch_metrics`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from clipshift.config import FetchConfig
from clipshift.data.ingest import fetch_source
from clipshift.data.manifest import MANIFEST
from clipshift.data.shards import INFO_FILE, DatasetInfo
from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic
from clipshift.tracking_api import NullTracker, Tracker

# What run_fetch returns beside the manifest: facts of this run, never written into out_dir
RUN_FACTS = ("fetch_seconds", "world_build_seconds", "removed_stale")
REFERENCE_ORDER = {"test": 0, "train": 1, "val": 2}  # sources that may define the task


def fetch_sources(
    cfg: FetchConfig, out_dir: Path, task_classes: list[str] | None, progress: bool
) -> dict[str, dict[str, Any]]:
    datasets: dict[str, dict[str, Any]] = {}
    # Without the world, the first labelled reference source (test, then train/val) defines
    # the task's classes, so that shifts mapped with class_map (ImageNet-R/-A) index them.
    for src in sorted(cfg.sources, key=lambda s: REFERENCE_ORDER.get(s.role, 9)):
        task_classes = task_classes or reference_classes(datasets)
        info: DatasetInfo = fetch_source(
            src,
            out_dir,
            Path(cfg.cache_dir),
            task_classes=task_classes,
            progress=progress,
            shard_size=cfg.world.shard_size,
        )
        datasets[info.name] = info.model_dump()
    return datasets


def reference_classes(datasets: dict[str, dict[str, Any]]) -> list[str] | None:
    """Classes of the first fetched reference set (test, train, val) that has any."""
    for info in datasets.values():
        if info["role"] in REFERENCE_ORDER and info.get("classes"):
            return list(info["classes"])
    return None


def _prune_stale(out_dir: Path, keep: set[str]) -> list[str]:
    removed = []
    for child in out_dir.iterdir():
        if child.is_dir() and (child / INFO_FILE).exists() and child.name not in keep:
            shutil.rmtree(child)
            removed.append(child.name)
    return removed


def run_fetch(cfg: FetchConfig, tracker: Tracker | None = None, progress: bool = True) -> dict:
    """Build the world (if enabled) and fetch every source; write ``manifest.json``.

    Returns the manifest as written plus this run's facts (:data:`RUN_FACTS`: timings, stale
    datasets removed), which stay out of ``out_dir`` so that it is byte-deterministic.
    """
    tracker = tracker or NullTracker()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest: dict[str, Any] = {"seed": cfg.seed, "task": {"classes": None}, "datasets": {}}
    facts: dict[str, Any] = {"world_build_seconds": None}
    if cfg.use_world:
        from clipshift.data.world import build_world  # cairosvg & fonts: only for the world

        world = build_world(cfg, out_dir, tracker=tracker, progress=progress)
        facts["world_build_seconds"] = world.pop("build_seconds", None)
        manifest.update({k: v for k, v in world.items() if k != "datasets"})
        manifest["datasets"].update(world["datasets"])
    task_classes = manifest["task"].get("classes")
    external = fetch_sources(cfg, out_dir, task_classes, progress)
    clash = set(external) & set(manifest["datasets"])
    if clash:
        raise DataError(
            f"source name(s) {sorted(clash)} collide with built-in world datasets; rename them "
            "in params.yaml fetch.sources"
        )
    manifest["datasets"].update(external)
    manifest["task"]["classes"] = task_classes or reference_classes(external)
    if not manifest["datasets"]:
        raise DataError("nothing to fetch: set fetch.use_world: true or list fetch.sources")
    facts["removed_stale"] = _prune_stale(out_dir, set(manifest["datasets"]))
    write_json_atomic(out_dir / MANIFEST, manifest)
    facts["fetch_seconds"] = round(time.perf_counter() - start, 2)
    return {**manifest, **facts}


def fetch_metrics(result: dict) -> dict[str, Any]:
    """Flat numbers for `dvc metrics show` (``metrics/fetch.json``): counts and timings."""
    datasets = result["datasets"]
    return {
        "num_classes": len(result["task"].get("classes") or []),
        "num_datasets": len(datasets),
        "samples": {name: info["num_samples"] for name, info in sorted(datasets.items())},
        "fetch_seconds": result.get("fetch_seconds"),
        "world_build_seconds": result.get("world_build_seconds"),
    }
