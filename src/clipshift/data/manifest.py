"""The fetch stage's ``manifest.json``: task classes and every dataset's entry. One reader."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipshift.data.shards import DatasetInfo
from clipshift.errors import DataError

MANIFEST = "manifest.json"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest as written by fetch; a clear error when it is missing or unreadable."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(
            f"no {MANIFEST} in '{data_dir}': it is not a fetch output; run "
            "`dvc repro fetch` (or `clipshift fetch`) first, or point the stage's data_dir at it"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete it and run fetch again") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not a JSON object; delete it and run fetch again")
    return manifest


def manifest_datasets(data_dir: str | Path) -> tuple[list[str], dict[str, DatasetInfo]]:
    """(task classes, {name: DatasetInfo}) from ``manifest.json``."""
    manifest = read_manifest(data_dir)
    path = Path(data_dir) / MANIFEST
    try:
        classes = list((manifest.get("task") or {}).get("classes") or [])
        datasets = {
            name: DatasetInfo.model_validate({"name": name, **entry})
            for name, entry in (manifest.get("datasets") or {}).items()
        }
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete it and run fetch again") from None
    if not datasets:
        raise DataError(f"{path} lists no datasets; run fetch again")
    return classes, datasets


def task_classes(data_dir: str | Path, fallback: Sequence[str] | None = None) -> list[str]:
    """Class names of the reference task: the manifest's, else ``fallback`` (a split's)."""
    if (Path(data_dir) / MANIFEST).exists():
        classes = (read_manifest(data_dir).get("task") or {}).get("classes")
        if classes:
            return list(classes)
    if fallback:
        return list(fallback)
    raise DataError(
        f"no class names in {Path(data_dir) / MANIFEST} nor in the test split's dataset.json; "
        "re-run `dvc repro fetch`"
    )
