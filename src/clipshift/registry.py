"""The models index: which model files a stage wrote, and what each one is.

Every model-producing stage (finetune, interpolate) writes ``<out_dir>/index.json``, a list of
:class:`ModelEntry`; a stage run once per pool (supervised) writes one per pool folder,
``<out_dir>/<pool>/index.json``. The evaluate stage globs ``<models_dir>/*/index.json`` and
``<models_dir>/*/*/index.json`` and evaluates every entry, so adding a new kind of model never
needs an edit to evaluate's input list.

Paths are stored relative to the index's own directory, so a ``models/`` tree can be moved (or
pulled from a DVC remote elsewhere) without rewriting indices; :func:`read_indices` turns them
back into paths usable from the current directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic

INDEX_FILE = "index.json"
# a stage's index, or one per pool folder of a stage run once per pool (DVC foreach)
INDEX_GLOBS = (f"*/{INDEX_FILE}", f"*/*/{INDEX_FILE}")
PRETRAINED_FILE = "checkpoint.pt"  # <pretrain out_dir>/<pool>/checkpoint.pt

Kind = Literal["baseline", "zeroshot", "finetuned", "linear", "knn", "wiseft", "soup", "supervised"]


class ModelEntry(BaseModel):
    """One evaluable model."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Unique across all indices.")
    kind: Kind
    pool: str | None = Field(None, description="Pretraining pool it derives from (None: baseline).")
    wise_alpha: float | None = Field(
        None, description="WiSE-FT mixing weight (wiseft models only)."
    )
    path: str = Field(..., description="Model file, relative to the index directory on disk.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Training facts (lr, seed, …).")


def write_index(out_dir: str | Path, entries: Iterable[ModelEntry]) -> Path:
    """Write ``<out_dir>/index.json``.

    Entry paths are relative to ``out_dir`` (absolute paths inside it are made relative).
    """
    out_dir = Path(out_dir)
    rows = []
    ids: set[str] = set()
    for entry in entries:
        if entry.id in ids:
            raise DataError(f"model id '{entry.id}' appears twice in {out_dir / INDEX_FILE}")
        ids.add(entry.id)
        path = Path(entry.path)
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(out_dir.resolve())
            except ValueError:
                raise DataError(
                    f"model file {entry.path} of '{entry.id}' is outside {out_dir}; "
                    "write model files inside the stage's out_dir"
                ) from None
        rows.append(entry.model_copy(update={"path": path.as_posix()}).model_dump())
    return write_json_atomic(out_dir / INDEX_FILE, {"models": rows})


def read_index(index_path: str | Path) -> list[ModelEntry]:
    """Entries of one index, with paths joined to the index's directory."""
    index_path = Path(index_path)
    try:
        rows = json.loads(index_path.read_text())["models"]
        entries = [ModelEntry.model_validate(r) for r in rows]
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise DataError(
            f"models index {index_path} is unreadable ({exc}); re-run the stage that wrote it"
        ) from None
    base = index_path.parent
    return [e.model_copy(update={"path": str(base / e.path)}) for e in entries]


def read_indices(models_dir: str | Path) -> list[ModelEntry]:
    """All entries of the indices under ``models_dir`` (:data:`INDEX_GLOBS`, sorted by path);
    ids are unique."""
    models_dir = Path(models_dir)
    entries: list[ModelEntry] = []
    seen: dict[str, Path] = {}
    found = {path for pattern in INDEX_GLOBS for path in models_dir.glob(pattern)}
    for index_path in sorted(found):
        for entry in read_index(index_path):
            if entry.id in seen:
                raise DataError(
                    f"model id '{entry.id}' is in both {seen[entry.id]} and {index_path}; "
                    "ids must be unique across stages"
                )
            seen[entry.id] = index_path
            entries.append(entry)
    return entries


def find_pools(pretrain_dir: str | Path) -> list[str]:
    """Pools with a pretrained checkpoint: ``<pretrain_dir>/<pool>/checkpoint.pt``."""
    return sorted(p.parent.name for p in Path(pretrain_dir).glob(f"*/{PRETRAINED_FILE}"))
