"""Pandas tables the validate stage checks: per-sample rows, manifest, shards, coverage, leaks.

Readers used for training skip undecodable samples; here they must stay visible, so shards are
read at the tar level (:func:`clipshift.data.shards.group_members`) and every sample becomes a
row, with ``decodable=False`` and an ``error`` reason when it cannot be used.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from clipshift.data import phash as ph
from clipshift.data.shards import (
    IMAGE_EXTS,
    INFO_FILE,
    DatasetInfo,
    group_members,
    sha256_file,
)
from clipshift.errors import DataError

LABELLED_ROLES = ("train", "val", "test", "shift")
CAPTION_ROLES = ("pool", "retrieval")
EVAL_ROLES = ("val", "test", "shift", "retrieval")  # val too: it selects WiSE-FT's alpha
TRAIN_ROLES = ("train", "pool")

SAMPLE_COLUMNS = [
    "key",
    "dataset",
    "role",
    "shard",
    "sha256",
    "phash",
    "width",
    "height",
    "mode",
    "format",
    "decodable",
    "error",
    "caption",
    "caption_len",
    "cls",
    "drawing",
]


# --------------------------------------------------------------------------------------------
# per-sample rows


def _parse_image(payload: bytes) -> tuple[Image.Image | None, str | None]:
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None, "undecodable image"
    return image, None


def _parse_cls(payload: bytes | None) -> tuple[int | None, str | None]:
    if payload is None:
        return None, None
    try:
        return int(payload.decode().strip()), None
    except (ValueError, UnicodeDecodeError):
        return None, "bad class index"


def sample_row(key: str, group: dict[str, bytes]) -> tuple[dict[str, Any], np.ndarray | None]:
    """One table row for one tar group, and the grey 32x32 array to hash (None if undecodable)."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    payload = group.get(ext) if ext else None
    image, error = _parse_image(payload) if payload is not None else (None, "missing image")
    cls, cls_error = _parse_cls(group.get("cls"))
    caption = group["txt"].decode("utf-8", errors="replace") if "txt" in group else None
    drawing = _parse_drawing(group.get("json"))
    row = {
        "key": key,
        "sha256": hashlib.sha256(payload).hexdigest() if payload is not None else None,
        "width": image.width if image else None,
        "height": image.height if image else None,
        "mode": image.mode if image else None,
        "format": image.format if image else None,
        "decodable": image is not None,
        "error": error or cls_error,
        "caption": caption,
        # stripped: a caption of blanks is as empty as no caption for a text encoder
        "caption_len": len(caption.strip()) if caption is not None else None,
        "cls": cls,
        "drawing": drawing,
    }
    return row, (ph.to_gray(image) if image is not None else None)


def _parse_drawing(payload: bytes | None) -> str | None:
    """The ``drawing`` id a sample's json declares (built-in world), None when absent."""
    if payload is None:
        return None
    try:
        meta = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    drawing = meta.get("drawing") if isinstance(meta, dict) else None
    return drawing if isinstance(drawing, str) else None


@dataclass
class ShardRead:
    """What reading one shard found, against what dataset.json / the manifest declared."""

    file: str
    declared_sha256: str
    declared_samples: int
    actual_sha256: str | None = None  # None: the file is missing
    counted_samples: int = 0
    error: str | None = None


def read_shard(path: str | Path, shard: ShardRead) -> list[dict[str, Any]]:
    """Rows of one shard (``phash`` filled in); fills ``shard`` with what was found.

    A top-level function of plain arguments, so a process pool can run it.
    """
    path = Path(path)
    if not path.exists():
        shard.error = "missing shard file"
        return []
    shard.actual_sha256 = sha256_file(path)
    rows, grays = [], []
    try:
        with tarfile.open(path, "r") as tar:
            for key, group in group_members(tar):
                row, gray = sample_row(key, group)
                row["shard"] = shard.file
                rows.append(row)
                grays.append(gray)
    except (tarfile.TarError, EOFError, OSError) as exc:
        # keep the rows read so far: the count and hash checks report the truncation
        shard.error = f"truncated or unreadable shard ({type(exc).__name__})"
    shard.counted_samples = len(rows)
    for row, value in zip(rows, _hashes(grays), strict=True):
        row["phash"] = value
    return rows


def _hashes(grays: list[np.ndarray | None]) -> list[int | None]:
    """pHash per image; None for undecodable and blank images (a blank image would "match"
    every other blank image)."""
    out: list[int | None] = [None] * len(grays)
    idx = [i for i, g in enumerate(grays) if g is not None]
    if idx:
        hashes, informative = ph.hash_grays(np.stack([g for g in grays if g is not None]))
        for i, h, ok in zip(idx, hashes.tolist(), informative.tolist(), strict=True):
            out[i] = h if ok else None
    return out


def _read_disk_info(dataset_dir: Path) -> DatasetInfo | None:
    try:
        return DatasetInfo.model_validate_json((dataset_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None  # missing or corrupt: the manifest checks report it


def shard_plan(info: DatasetInfo, disk_info: DatasetInfo | None) -> list[ShardRead]:
    """Shards to read: the manifest's, plus any only dataset.json lists; manifest values win."""
    specs = {s.file: s for s in (disk_info.shards if disk_info else [])}
    specs.update({s.file: s for s in info.shards})
    order = [s.file for s in info.shards] + [
        f for f in specs if f not in {s.file for s in info.shards}
    ]
    return [ShardRead(f, specs[f].sha256, specs[f].num_samples) for f in order]


@dataclass
class DatasetRead:
    name: str
    info: DatasetInfo  # as declared in the manifest
    disk_info: DatasetInfo | None  # dataset.json on disk (None: missing or corrupt)
    samples: pd.DataFrame
    shards: list[ShardRead] = field(default_factory=list)


def _sample_frame(info: DatasetInfo, rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in SAMPLE_COLUMNS if c not in ("dataset", "role")])
    table.insert(1, "dataset", info.name)
    table.insert(2, "role", info.role)
    table["phash"] = pd.array(table["phash"].tolist(), dtype="UInt64")
    for col in ("width", "height", "caption_len", "cls"):
        table[col] = pd.array(table[col].tolist(), dtype="Int64")
    table["decodable"] = table["decodable"].astype(bool)
    return table[SAMPLE_COLUMNS]


def read_datasets(
    data_dir: str | Path,
    infos: dict[str, DatasetInfo],
    workers: int = 1,
    on_sample: Callable[[int], None] | None = None,
) -> list[DatasetRead]:
    """Every sample of every dataset as a row (corrupt ones included), shards in parallel.

    ``workers > 1`` reads shards in that many forked processes (Linux; elsewhere serially).
    Fork, like torch's DataLoader workers, because spawn would re-import the caller's
    ``__main__`` and break scripts without a main guard; the children only read files.
    Results are assembled in manifest order, so the output does not depend on ``workers``.
    """
    data_dir = Path(data_dir)
    plans = {}
    for name, info in infos.items():
        disk_info = _read_disk_info(data_dir / name)
        plans[name] = (disk_info, shard_plan(info, disk_info))
    jobs = [(name, shard) for name, (_, shards) in plans.items() for shard in shards]
    results: dict[tuple[str, str], tuple[list[dict], ShardRead]] = {}

    def done(name: str, shard: ShardRead, rows: list[dict]) -> None:
        results[name, shard.file] = (rows, shard)
        if on_sample is not None:
            on_sample(len(rows))

    if workers > 1 and len(jobs) > 1 and sys.platform == "linux":
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {
                pool.submit(_read_job, data_dir / name / shard.file, shard): name
                for name, shard in jobs
            }
            for fut in as_completed(futures):
                rows, shard = fut.result()
                done(futures[fut], shard, rows)
    else:
        for name, shard in jobs:
            done(name, shard, read_shard(data_dir / name / shard.file, shard))
    reads = []
    for name, info in infos.items():
        disk_info, shards = plans[name]
        parts = [results[name, s.file] for s in shards]
        rows = [row for part, _ in parts for row in part]
        read = DatasetRead(name, info, disk_info, _sample_frame(info, rows), [s for _, s in parts])
        reads.append(read)
    return reads


def _read_job(path: Path, shard: ShardRead) -> tuple[list[dict[str, Any]], ShardRead]:
    rows = read_shard(path, shard)
    return rows, shard  # the worker's copy of ``shard`` carries the counts back


# --------------------------------------------------------------------------------------------
# tables over all datasets


def manifest_table(reads: list[DatasetRead]) -> pd.DataFrame:
    """One row per dataset: sample counts in the manifest, in dataset.json, and counted."""
    rows = [
        {
            "dataset": r.name,
            "role": r.info.role,
            "declared_samples": r.info.num_samples,
            "info_samples": r.disk_info.num_samples if r.disk_info is not None else -1,
            "counted_samples": len(r.samples),
            "declared_shards": len(r.info.shards),
            "info_shards": len(r.disk_info.shards) if r.disk_info is not None else -1,
        }
        for r in reads
    ]
    return pd.DataFrame(rows)


def shard_table(reads: list[DatasetRead]) -> pd.DataFrame:
    """One row per shard: declared vs actual sha256 and sample count."""
    rows = [
        {
            "dataset": r.name,
            "shard": f"{r.name}/{s.file}",
            "declared_sha256": s.declared_sha256,
            "actual_sha256": s.actual_sha256 or "missing",
            "declared_samples": s.declared_samples,
            "counted_samples": s.counted_samples,
            "error": s.error,
        }
        for r in reads
        for s in r.shards
    ]
    columns = [
        "dataset",
        "shard",
        "declared_sha256",
        "actual_sha256",
        "declared_samples",
        "counted_samples",
        "error",
    ]
    return pd.DataFrame(rows, columns=columns)


def label_names(info: DatasetInfo, task_classes: list[str]) -> list[str]:
    """The class names a dataset's ``cls`` indexes: the task's, unless fetch recorded that the
    labels index the source's own classes (``extra.label_space == "source"``)."""
    if info.extra.get("label_space") == "source" or not task_classes:
        return list(info.classes or [])
    return list(task_classes)


def expected_classes(info: DatasetInfo, task_classes: list[str]) -> list[int]:
    """Class indices a labelled dataset must cover: all of its label space, or its subset.

    A shift that covers only part of the task (ImageNet-R/-A style) declares it in dataset.json
    as ``extra.class_subset``: task class names or indices.
    """
    names = label_names(info, task_classes)
    subset = info.extra.get("class_subset")
    if subset is None:
        return list(range(len(names)))
    index = {n: i for i, n in enumerate(names)}
    unknown = [c for c in subset if isinstance(c, str) and c not in index]
    if unknown:
        raise DataError(
            f"dataset '{info.name}' declares extra.class_subset entries that are not task "
            f"classes: {unknown[:5]}; fix the class names in its dataset.json (or the source's "
            "class_map) and run fetch again"
        )
    return sorted({index[c] if isinstance(c, str) else int(c) for c in subset})


def coverage_table(
    reads: list[DatasetRead], task_classes: list[str], excluded: dict[str, set[str]]
) -> pd.DataFrame:
    """One row per (labelled dataset, expected class): usable examples left after exclusions."""
    rows = []
    for r in reads:
        if r.info.role not in LABELLED_ROLES:
            continue
        names = label_names(r.info, task_classes)
        s = r.samples
        usable = s[s["decodable"] & s["cls"].notna() & ~s["key"].isin(excluded.get(r.name, set()))]
        counts = usable["cls"].astype(int).value_counts()
        totals = s["cls"].dropna().astype(int).value_counts()
        for c in expected_classes(r.info, task_classes):
            rows.append(
                {
                    "dataset": r.name,
                    "class": names[c] if c < len(names) else str(c),
                    "cls": c,
                    "count": int(counts.get(c, 0)),
                    "count_before_exclusion": int(totals.get(c, 0)),
                }
            )
    columns = ["dataset", "class", "cls", "count", "count_before_exclusion"]
    return pd.DataFrame(rows, columns=columns)


def leak_pairs(evals: pd.DataFrame, trains: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Every (evaluation sample, training sample) pair with identical bytes or close pHashes.

    Columns: dataset, key (evaluation side), train_dataset, train_key, distance (pHash bits,
    -1 when a side has no hash), exact (identical image bytes).
    """
    columns = ["dataset", "key", "train_dataset", "train_key", "distance", "exact"]
    ev = evals.reset_index(drop=True)
    tr = trains.reset_index(drop=True)
    exact = (
        ev[ev["sha256"].notna()][["dataset", "key", "sha256"]]
        .merge(
            tr[tr["sha256"].notna()][["dataset", "key", "sha256"]].rename(
                columns={"dataset": "train_dataset", "key": "train_key"}
            ),
            on="sha256",
        )
        .drop(columns="sha256")
    )
    exact["exact"] = True
    eh, th = ev[ev["phash"].notna()], tr[tr["phash"].notna()]
    m = ph.near_duplicates(
        eh["phash"].to_numpy(np.uint64), th["phash"].to_numpy(np.uint64), max_distance
    )
    near = pd.DataFrame(
        {
            "dataset": eh["dataset"].to_numpy()[m.query],
            "key": eh["key"].to_numpy()[m.query],
            "train_dataset": th["dataset"].to_numpy()[m.ref],
            "train_key": th["key"].to_numpy()[m.ref],
            "distance": m.distance,
        }
    )
    pairs = near.merge(exact, on=["dataset", "key", "train_dataset", "train_key"], how="outer")
    pairs["exact"] = pairs["exact"].astype("boolean").fillna(False).astype(bool)
    pairs["distance"] = pairs["distance"].fillna(-1).astype(int)
    return pairs[columns].sort_values(columns[:4]).reset_index(drop=True)


def leak_counts(pairs: pd.DataFrame, eval_names: list[str], train_names: list[str]) -> pd.DataFrame:
    """Leaked evaluation samples per (evaluation, training) dataset pair, zeros included."""
    grid = pd.MultiIndex.from_product([eval_names, train_names], names=["dataset", "train_dataset"])
    by_pair = ["dataset", "train_dataset"]
    leaked = pairs.groupby(by_pair)["key"].nunique()
    exact = pairs[pairs["exact"]].groupby(by_pair)["key"].nunique()
    out = pd.DataFrame(index=grid)
    out["leaked"] = leaked.reindex(grid, fill_value=0).astype(int) if len(leaked) else 0
    out["exact"] = exact.reindex(grid, fill_value=0).astype(int) if len(exact) else 0
    out["near"] = out["leaked"] - out["exact"]  # leaked by pHash only: the bytes differ
    return out.reset_index()


HELD_OUT_ROLES = (*EVAL_ROLES, "train")  # the fine-tuning set's drawings are the test's


def drawing_overlap(reads: list[DatasetRead]) -> pd.DataFrame:
    """One row per (pool, drawing) pair: how many pool samples show it, and which held-out sets
    (evaluation or fine-tuning) show the same drawing; ``held_out`` is True for those.

    A drawing is one artist's design of one emoji (the ``drawing`` id in a sample's json), so a
    re-render with other augmentation or a derived style is caught where pixel hashes miss it.
    Datasets without drawing ids (external sources) contribute no rows.
    """
    columns = ["dataset", "drawing", "samples", "shown_in", "held_out"]
    shown: dict[str, set[str]] = {}
    for r in reads:
        if r.info.role in HELD_OUT_ROLES:
            for drawing in r.samples["drawing"].dropna().unique():
                shown.setdefault(drawing, set()).add(r.name)
    rows = []
    for r in reads:
        if r.info.role != "pool":
            continue
        for drawing, count in r.samples["drawing"].dropna().value_counts().sort_index().items():
            where = ",".join(sorted(shown.get(str(drawing), ())))
            rows.append((r.name, drawing, int(count), where, bool(where)))
    return pd.DataFrame(rows, columns=columns)
