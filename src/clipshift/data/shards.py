"""Webdataset shards: deterministic writing, atomic publication, tolerant reading.

A dataset is a directory holding ``dataset.json`` (see :class:`DatasetInfo`) and tar shards in
the webdataset / img2dataset layout: members ``<key>.<ext>`` grouped by key, with an image
(``png``/``jpg``/``webp``), a caption (``txt``), a class index (``cls``) and metadata
(``json``). Shards are written with fixed tar headers so the same samples give the same bytes
(and so the same DVC hashes), into a temporary directory that replaces the old one only when
complete: a crash never leaves a half-written dataset where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from clipshift.errors import DataError
from clipshift.io_utils import output_lock, write_error_message

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
INFO_FILE = "dataset.json"


class ShardInfo(BaseModel):
    file: str
    sha256: str
    num_samples: int


class DatasetInfo(BaseModel):
    """What ``dataset.json`` records about one dataset."""

    name: str
    role: str = Field(description="pool | train | val | test | shift | retrieval")
    num_samples: int
    classes: list[str] | None = None
    styles: list[str] = Field(default_factory=list)
    source: str = "clipshift-world"
    image_size: int | None = None
    shards: list[ShardInfo] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)

    def shard_paths(self, root: str | Path) -> list[Path]:
        return [Path(root) / s.file for s in self.shards]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG" if fmt == "png" else fmt.upper(), optimize=False)
    return buf.getvalue()


def _member_bytes(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        return encode_image(value, ext)
    if ext == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    return str(value).encode()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed header fields: identical samples give identical shard bytes
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


@dataclass
class ShardWriter:
    """Write samples into ``out_dir`` atomically; use as a context manager.

    Samples are dicts with ``__key__`` and one entry per extension (``png``, ``txt``, ``cls``,
    ``json``; PIL images are encoded). Everything goes to ``<out_dir>.partial`` first; on a
    clean exit the old ``out_dir`` is replaced in one rename. A failed write (disk full) raises
    a :class:`DataError` naming the shard and the fix, removes the partial directory and leaves
    the previous ``out_dir`` as it was. ``<out_dir>.lock`` is held meanwhile, so a concurrent
    writer of the same dataset waits (see :func:`clipshift.io_utils.output_lock`).
    """

    out_dir: Path
    info: DatasetInfo
    shard_size: int = 2000
    _partial: Path = field(init=False)
    _tar: tarfile.TarFile | None = field(init=False, default=None)
    _in_shard: int = field(init=False, default=0)
    _keys: set[str] = field(init=False, default_factory=set)
    _lock: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._partial = self.out_dir.with_name(self.out_dir.name + ".partial")

    def __enter__(self) -> ShardWriter:
        # One writer per dataset at a time: a second run (another pipeline on the same output
        # directory) waits here rather than sharing, and wiping, our .partial directory.
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self.out_dir))
        try:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial.mkdir(parents=True)
        except OSError as exc:
            self._lock.close()
            raise self._write_error(exc, self._partial) from exc
        self.info.shards = []
        self.info.num_samples = 0
        return self

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise DataError(
                f"sample key '{key}' may not contain '.' or '/' (webdataset splits on them)"
            )
        if key in self._keys:
            raise DataError(f"duplicate sample key '{key}' in dataset '{self.info.name}'")
        self._keys.add(key)
        payloads = [
            (f"{key}.{ext}", _member_bytes(ext, value))
            for ext, value in sample.items()
            if ext != "__key__" and value is not None
        ]
        try:
            if self._tar is None or self._in_shard >= self.shard_size:
                self._close_shard()
                name = f"shard-{len(self.info.shards):06d}.tar"
                self.info.shards.append(ShardInfo(file=name, sha256="", num_samples=0))
                self._tar = tarfile.open(self._partial / name, "w", format=tarfile.USTAR_FORMAT)
            for member, payload in payloads:
                _add_member(self._tar, member, payload)
        except OSError as exc:  # disk full, quota, I/O error: name the shard and the fix
            raise self._write_error(exc, self._partial / self.info.shards[-1].file) from exc
        self._in_shard += 1
        self.info.shards[-1].num_samples += 1
        self.info.num_samples += 1

    def write_all(self, samples: Iterable[dict[str, Any]]) -> None:
        for sample in samples:
            self.write(sample)

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.info.shards[-1]
        path = self._partial / shard.file
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        shard.sha256 = sha256_file(path)
        self._tar, self._in_shard = None, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._lock:
            if exc_type is not None:
                self._discard()
                return
            try:
                self._close_shard()
                (self._partial / INFO_FILE).write_text(self.info.model_dump_json(indent=2))
                publish_dir(self._partial, self.out_dir)
            except OSError as err:
                self._discard()
                raise self._write_error(err, self._partial) from err

    def _discard(self) -> None:
        """Drop the unfinished dataset; the published one (if any) is untouched."""
        if self._tar is not None:
            with contextlib.suppress(OSError):  # closing writes the end blocks: may fail too
                self._tar.close()
            self._tar = None
        shutil.rmtree(self._partial, ignore_errors=True)

    def _write_error(self, exc: OSError, path: Path) -> DataError:
        what = f"dataset '{self.info.name}' shard"
        return DataError(write_error_message(exc, path, what))


def publish_dir(partial: Path, final: Path) -> None:
    """Replace ``final`` by ``partial`` with renames only, so readers see old or new, never half."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    try:
        partial.rename(final)
    except OSError:
        if old.exists() and not final.exists():
            old.rename(final)  # put the previous dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)


def dataset_fingerprint(dataset_dir: str | Path) -> str | None:
    """A short hash of a dataset's shard contents (from dataset.json); None if it has none.

    Lets resumable work (pretraining, scaling runs) tell that its data changed underneath it.
    """
    if not (Path(dataset_dir) / INFO_FILE).exists():
        return None
    shards = [f"{s.file}:{s.sha256}:{s.num_samples}" for s in load_info(dataset_dir).shards]
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


def load_info(dataset_dir: str | Path) -> DatasetInfo:
    path = Path(dataset_dir) / INFO_FILE
    if not path.exists():
        raise DataError(
            f"'{dataset_dir}' is not a clipshift dataset (no {INFO_FILE}); run `clipshift fetch` "
            "(or `dvc repro fetch`) first"
        )
    try:
        return DatasetInfo.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is corrupt ({exc}); delete it and run fetch again") from None


@dataclass
class ReadStats:
    """Counts what a reader skipped, so callers can enforce a threshold and report it."""

    read: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive tar members sharing a key (webdataset rule)."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name = member.name
        if name.startswith("/") or ".." in Path(name).parts:
            raise DataError(
                f"unsafe member path '{name}' in shard {tar.name!r}; refusing to read it"
            )
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        prefix = name[: len(name) - len(base)] + stem
        if key is not None and prefix != key:
            yield key, group
            group = {}
        key = prefix
        handle = tar.extractfile(member)
        group[ext.lower()] = handle.read() if handle else b""
    if key is not None:
        yield key, group


def decode_sample(key: str, group: dict[str, bytes]) -> dict[str, Any]:
    """Decode one sample; raises ValueError with a short reason if it is unusable."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        raise ValueError("missing image")
    try:
        image = Image.open(io.BytesIO(group[ext]))
        image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError("undecodable image") from None
    sample: dict[str, Any] = {"__key__": key, "image": image, "image_bytes": group[ext]}
    if "txt" in group:
        sample["txt"] = group["txt"].decode("utf-8", errors="replace")
    if "cls" in group:
        try:
            sample["cls"] = int(group["cls"].decode().strip())
        except ValueError:
            raise ValueError("bad class index") from None
    if "json" in group:
        try:
            sample["json"] = json.loads(group["json"])
        except ValueError:
            raise ValueError("bad json metadata") from None
    return sample


def iter_shard(path: str | Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one local shard; corrupt samples are counted in ``stats`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    try:
        with tarfile.open(path, "r") as tar:
            for key, group in group_members(tar):
                try:
                    sample = decode_sample(key, group)
                except ValueError as exc:
                    stats.skip(str(exc))
                    continue
                stats.read += 1
                yield sample
    except (tarfile.TarError, EOFError, OSError) as exc:
        stats.skip(f"truncated or unreadable shard ({type(exc).__name__})")


def iter_dataset(
    dataset_dir: str | Path, stats: ReadStats | None = None
) -> Iterator[dict[str, Any]]:
    info = load_info(dataset_dir)
    for path in info.shard_paths(dataset_dir):
        if not path.exists():
            raise DataError(f"shard {path} listed in {INFO_FILE} is missing; run fetch again")
        yield from iter_shard(path, stats)
