"""Checkpoint files: atomic writes, checksums, safe loading, open_clip-compatible exports.

Every checkpoint clipshift writes is first written to ``<path>.tmp``, flushed and fsynced,
then renamed over ``<path>``: a crash leaves the old file or the new one, never half of one.
The sha256 of the bytes goes to a sidecar ``<path>.sha256`` so later damage (a truncated copy,
a disk error) is caught before a corrupt state is trained on. Loading always uses
``torch.load(weights_only=True)``: a checkpoint is data, and one that tries to run code when
unpickled is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from clipshift.data.shards import sha256_file
from clipshift.errors import CheckpointError
from clipshift.io_utils import write_json_atomic

SIDECAR_SUFFIX = ".sha256"
CONFIG_SUFFIX = ".config.json"
_STEP_RE = re.compile(r"(\d+)")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def config_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CONFIG_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk too.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write small files (sidecars, JSON) with the same tmp + fsync + rename discipline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and record its sha256 in ``<path>.sha256``.

    Order matters: the old sidecar is removed first, then the data file is renamed into place,
    then the new sidecar is written. At every instant the sidecar is either absent or matches
    the data file, and the data file is always complete (it was fsynced before the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        sidecar_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(sidecar_path(path), f"{digest}  {path.name}\n".encode())


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}' is corrupt ({why}); delete it (and its {SIDECAR_SUFFIX} sidecar) "
        "and resume from the previous checkpoint, or re-run the stage that wrote it"
    )


def verify_checksum(path: str | Path) -> bool | None:
    """True if the sidecar matches, None if there is no sidecar; raises if it does not match."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None
    expected = sidecar.read_text().split()
    if not expected:
        raise _corrupt(path, f"empty checksum file {sidecar.name}")
    actual = sha256_file(path)
    if actual != expected[0]:
        raise _corrupt(
            path,
            f"sha256 {actual[:12]}… does not match {expected[0][:12]}… in "
            f"{sidecar.name}; the file was truncated or changed after writing",
        )
    return True


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any plain torch checkpoint).

    A sidecar checksum, when present, must match. Files without one (e.g. downloaded open_clip
    weights) are loaded as they are; torch's zip format still catches most truncation.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint '{path}' not found; check the path or run the stage that writes it"
        )
    verify_checksum(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it contains objects that are not plain tensors "
            f"and containers (it may try to run code when loaded: {str(exc).splitlines()[0]}). "
            "Only load checkpoints you trust; re-export it as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(state).__name__}, not a dict; "
            "save a dict of tensors (e.g. {'state_dict': model.state_dict()})"
        )
    return state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes so stock open_clip can load the keys."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def save_open_clip_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    name: str,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint that ``open_clip.create_model_and_transforms(name, pretrained=path)``
    loads, plus ``<path>.config.json`` holding the architecture so that it can be registered
    (``open_clip.add_model_config``) in a process that does not know ``name``."""
    state_dict = clean_state_dict(unwrap_model(model).state_dict())
    state = {"state_dict": state_dict, "name": name, "model_config": config, **(extra or {})}
    save_checkpoint(path, state)
    write_json_atomic(config_path(path), config)


def _step_of(path: Path) -> int:
    numbers = _STEP_RE.findall(path.stem)
    return int(numbers[-1]) if numbers else -1


def list_checkpoints(directory: str | Path, pattern: str = "*.pt") -> list[Path]:
    """Checkpoint files in ``directory``, newest first (by step number in the name, then mtime)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob(pattern) if p.is_file()]
    return sorted(files, key=lambda p: (_step_of(p), p.stat().st_mtime_ns), reverse=True)


def is_valid_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> bool:
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return False
    return all(key in state for key in required)


def latest_checkpoint(
    directory: str | Path, required: tuple[str, ...] = ("model", "optimizer", "step")
) -> Path | None:
    """The newest checkpoint in ``directory`` that loads, passes its checksum and holds the
    ``required`` keys of a resumable state; corrupt or partial files are skipped."""
    for path in list_checkpoints(directory):
        if is_valid_checkpoint(path, required):
            return path
    return None
