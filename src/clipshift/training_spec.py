"""What determines a trained result, and what to do with earlier work that was made otherwise.

Every place that resumes or reuses earlier work (a pretraining run's resume states, a finished
checkpoint, a scaling run) compares a *training spec* — a flat mapping ``"pretrain.lr" ->
0.002`` of every resolved setting that can change the weights — with the one recorded beside
that work. Only an identical spec may resume or be reused; anything else is moved aside, named,
into ``<run dir>/superseded/`` (ignored by DVC) and the run starts from step 0, with one log
line naming what changed.

Settings are in the spec unless their config model lists them in ``RESULT_NEUTRAL``: a new
setting is weight-determining until someone shows it is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from clipshift.io_utils import write_json_atomic

log = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"  # listed in .dvcignore: set-aside work never enters DVC hashes
SPEC_FILE = "training_spec.json"
_SHOWN_CHARS = 40  # a changed value longer than this is summarised, not printed


def section_spec(section: str, cfg: BaseModel, neutral: Iterable[str] = ()) -> dict[str, Any]:
    """``cfg``'s fields as ``{"<section>.<field>": value}``, leaving out ``neutral`` fields and
    the model's own ``RESULT_NEUTRAL`` ones (settings that provably cannot change a result)."""
    skip = set(neutral) | set(getattr(cfg, "RESULT_NEUTRAL", ()))
    dumped = cfg.model_dump(mode="json", by_alias=True)
    return {f"{section}.{key}": value for key, value in dumped.items() if key not in skip}


def canonical(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` as it reads back from JSON (tuples → lists, …), so stored and live specs
    compare equal exactly when their JSON does."""
    return json.loads(json.dumps(dict(spec), sort_keys=True, default=str))


def fingerprint(spec: Mapping[str, Any]) -> str:
    """A short, order-independent digest of a spec (canonical JSON)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if value is not None else "unset"
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"<{fingerprint({'v': value})[:8]}>"


def describe_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """``"pretrain.lr 0.001 → 0.002, pretrain.seed 0 → 1"``: what differs between two specs."""
    if before is None:
        return "no training spec was recorded with it (written by an older clipshift)"
    keys = sorted(set(before) | set(after))
    changes = [
        f"{key} {_shown(before.get(key))} → {_shown(after.get(key))}"
        for key in keys
        if before.get(key) != after.get(key)
    ]
    return ", ".join(changes) or "nothing"


def read_spec(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SPEC_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an unreadable record cannot vouch for the work beside it


def has_work(run_dir: str | Path) -> bool:
    """True if ``run_dir`` holds anything besides its spec and set-aside work."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return any(p.name not in (SPEC_FILE, SUPERSEDED_DIR) for p in run_dir.iterdir())


def set_aside(run_dir: str | Path, old_spec: Mapping[str, Any] | None) -> Path:
    """Move everything in ``run_dir`` (but earlier set-aside work) to
    ``<run_dir>/superseded/<UTC time>-<old fingerprint>/`` and return that folder."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    label = fingerprint(old_spec) if old_spec is not None else "unrecorded"
    dest = run_dir / SUPERSEDED_DIR / f"{stamp}-{label}"
    suffix = 1
    while dest.exists():  # two set-asides within one second
        dest = dest.with_name(f"{stamp}-{label}-{suffix}")
        suffix += 1
    dest.mkdir(parents=True)
    for entry in list(run_dir.iterdir()):
        if entry.name != SUPERSEDED_DIR:
            os.replace(entry, dest / entry.name)
    return dest


def claim_run_dir(run_dir: str | Path, spec: Mapping[str, Any], what: str) -> Path | None:
    """Make ``run_dir`` hold only work made with ``spec``: earlier work with another (or no
    recorded) spec is set aside with one log line saying what changed. Records ``spec`` in
    ``<run_dir>/training_spec.json``. Returns where earlier work went, or None."""
    run_dir = Path(run_dir)
    stored = read_spec(run_dir)
    moved = None
    spec = canonical(spec)
    if has_work(run_dir) and stored != spec:
        moved = set_aside(run_dir, stored)
        log.warning(
            "%s: earlier work in %s was trained with other settings (%s); moved it to %s; "
            "this run starts from scratch (delete that folder to reclaim the space)",
            what,
            run_dir,
            describe_changes(stored, spec),
            moved,
        )
    if stored != spec or moved is not None:
        write_json_atomic(run_dir / SPEC_FILE, spec)
    return moved
