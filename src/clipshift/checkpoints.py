"""Checkpoint files: atomic writes, checksums, safe loading, open_clip-compatible exports.

Every checkpoint clipshift writes is first written to a private ``<path>.<pid>-<hex>.tmp``,
flushed and fsynced, then renamed over ``<path>``: a crash leaves the old file or the new one,
never half of one.
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

from clipshift import distributed as D
from clipshift.data.shards import sha256_file
from clipshift.data.sources import materialise, parse_uri
from clipshift.errors import CheckpointError, ConfigError
from clipshift.io_utils import temp_path, write_error_message, write_json_atomic

SIDECAR_SUFFIX = ".sha256"
CONFIG_SUFFIX = ".json"  # <checkpoint folder>/<architecture name>.json: what open_clip scans
LEGACY_CONFIG_SUFFIX = ".config.json"  # <checkpoint>.config.json, written before
_STEP_RE = re.compile(r"(\d+)")
CHECKPOINT_CACHE = ".cache/clipshift"  # fetch.cache_dir's default: one download cache


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def config_path(path: str | Path, name: str) -> Path:
    """Where the architecture ``name`` of checkpoint ``path`` is saved: ``<folder>/<name>.json``,
    so that ``open_clip.add_model_config(<folder>)`` registers it under ``name`` (open_clip
    names a config file's architecture after the file's stem)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"architecture name {name!r} cannot name a config file beside {path}; give the "
            "model a plain open_clip name (no path separators)"
        )
    return Path(path).with_name(name + CONFIG_SUFFIX)


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


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and record its sha256 in ``<path>.sha256``.

    Both new files are written and fsynced to private temp names first; then the old sidecar
    is removed, the data file renamed into place and the new sidecar renamed beside it. At
    every instant the sidecar is either absent or matches the data file, and the data file is
    always complete. Everything that can run out of space happens before the first rename, so
    a failed write (disk full) leaves the previous checkpoint and its sidecar untouched and no
    temp file, and raises a :class:`CheckpointError` naming the path and the fix.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    # Private temp names: concurrent writers never share (and mix) a temp file.
    tmp, sidecar_tmp = temp_path(path), temp_path(sidecar)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _write_synced(sidecar_tmp, f"{sha256_file(tmp)}  {path.name}\n".encode())
        sidecar.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(sidecar_tmp, sidecar)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        oserr = _write_failure(exc)
        if oserr is None:
            raise
        raise CheckpointError(write_error_message(oserr, path, "checkpoint")) from exc
    finally:
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)


def _write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: torch.save reports one raised by the file object
    (disk full) as a RuntimeError from its zip writer, with the OSError as context."""
    if isinstance(exc, OSError):
        return exc
    context = exc.__cause__ or exc.__context__
    return context if isinstance(context, OSError) else None


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
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
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
    loads, plus its architecture as ``<folder>/<name>.json`` (:func:`config_path`), so that a
    process that does not know ``name`` registers it with
    ``open_clip.add_model_config(<folder>)`` (or that file) first."""
    target = config_path(path, name)  # refuses a name that cannot be a file name, before writing
    state_dict = clean_state_dict(unwrap_model(model).state_dict())
    state = {"state_dict": state_dict, "name": name, "model_config": config, **(extra or {})}
    save_checkpoint(path, state)
    write_json_atomic(target, config)
    # the layout before: <checkpoint>.config.json, which open_clip registers under a wrong name
    Path(path).with_name(Path(path).name + LEGACY_CONFIG_SUFFIX).unlink(missing_ok=True)


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


def local_checkpoint(uri: str, cache_dir: str | Path = CHECKPOINT_CACHE) -> Path:
    """A local file for ``uri``: a path as it is, ``s3://bucket/key`` or
    ``https://host/file#sha256=<hex>`` downloaded once into ``<cache_dir>/downloads`` (resumable,
    verified, re-fetched only when the object changes; see :mod:`clipshift.data.sources`).

    Under torchrun the first rank of each node downloads while the others wait, then they all
    find the file in the cache: the ranks of a node never race on one ``.part`` file.
    """
    if "://" not in uri:
        return Path(uri)
    base, _, fragment = uri.partition("#sha256=")
    loc = parse_uri(base)
    if loc.scheme in ("http", "https") and not fragment:
        raise ConfigError(
            f"init_checkpoint '{uri}' is an http(s) URL without a checksum; append "
            "'#sha256=<hex digest of the file>' so a changed or corrupt download is refused"
        )

    def fetch() -> Path:
        return materialise(loc, Path(cache_dir), sha256=fragment or None, progress=False)

    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    path = fetch() if first else None
    D.barrier()
    return path or fetch()
