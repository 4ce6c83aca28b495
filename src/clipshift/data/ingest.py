"""Turn one external source (``SourceConfig``) into a canonical clipshift dataset directory.

Two layouts are understood, wherever they live (local, ``s3://``, ``https://``, brace patterns,
or packed in one tar/tar.gz archive):

- **webdataset / img2dataset shards**: members ``<key>.jpg|png|webp`` with ``txt`` caption,
  ``json`` metadata and maybe ``cls``. Every sample is decoded once to check it; unusable ones
  (no image, undecodable or mislabelled bytes, absurd captions, bad metadata) are skipped and
  counted by reason in ``dataset.json`` ``extra``, because web-scale data always has some.
- **ImageFolder trees** (``root/<class folder>/<image>``) for evaluation sets, optionally mapped
  onto a subset of the task's classes with ``class_map`` (ImageNet-R/-A, ObjectNet style);
  ``class_map: imagenet`` maps ImageNet's own layouts with no hand-written map
  (:mod:`clipshift.data.imagenet`).

Images are stored as the original bytes under their original extension: re-encoding would
change the pixels the study measures. The output is written by :class:`ShardWriter`, so it
appears atomically and only when complete.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from clipshift.config import SourceConfig
from clipshift.data import imagenet
from clipshift.data.download import DownloadFailed
from clipshift.data.shards import (
    IMAGE_EXTS,
    DatasetInfo,
    ReadStats,
    ShardWriter,
    group_members,
    sha256_file,
)
from clipshift.data.sources import (
    Location,
    RemoteStat,
    expand_braces,
    materialise,
    parse_uri,
    s3_list,
)
from clipshift.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LABELLED_ROLES = ("train", "val", "test", "shift")
# Captions far beyond CLIP's 77-token context are spam or scraped page text, not alt-text.
MAX_CAPTION_CHARS = 4096
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "avif", "heic")


class SkipSample(Exception):
    """A sample is unusable; the message is the reason recorded in ``dataset.json``."""


@dataclass(frozen=True)
class Shard:
    """A webdataset shard; ``fetch`` materialises it lazily so ``max_samples`` stops downloads."""

    uri: str
    fetch: Callable[[], Path]


@dataclass(frozen=True)
class ImageEntry:
    """One file of an ImageFolder tree: ``<root>/<folder>/<name>``."""

    folder: str
    name: str
    uri: str
    read: Callable[[], bytes]


# --------------------------------------------------------------------------------------------
# entry point


def fetch_source(
    src: SourceConfig,
    out_dir: Path,
    cache_dir: Path,
    task_classes: list[str] | None = None,
    progress: bool = True,
    shard_size: int = 2000,
) -> DatasetInfo:
    """Normalise ``src`` into ``<out_dir>/<src.name>/`` (dataset.json + shards) and describe it."""
    cache_dir = Path(cache_dir)
    fmt, items, extra = resolve(src, cache_dir, progress)
    stats = ReadStats()
    if fmt == "webdataset":
        labels = wds_label_map(src, task_classes)
        samples = webdataset_samples(items, labels, stats, extra, src.role in LABELLED_ROLES)
    else:
        labels = folder_label_map(src, sorted({e.folder for e in items}), task_classes)
        samples = imagefolder_samples(items, labels, stats, src.max_samples)
    info = DatasetInfo(
        name=src.name, role=src.role, num_samples=0, classes=labels.classes, source=src.uri
    )
    with ShardWriter(Path(out_dir) / src.name, info, shard_size=shard_size) as writer:
        _write(writer, samples, src, progress)
        if info.num_samples == 0:
            raise DataError(_empty_message(src, stats))
        info.extra = {
            **extra,
            "format": fmt,
            "label_space": labels.space,
            "read": stats.read,
            "skipped": stats.skipped,
            "skip_reasons": dict(sorted(stats.reasons.items())),
            **labels.describe(),
        }
    return info


def _write(writer: ShardWriter, samples: Iterable[dict], src: SourceConfig, progress: bool) -> None:
    bar = tqdm(total=src.max_samples, desc=f"fetch {src.name}", unit="img", disable=not progress)
    with bar:
        for sample in samples:
            writer.write(sample)
            bar.update(1)
            if src.max_samples is not None and writer.info.num_samples >= src.max_samples:
                break


def _empty_message(src: SourceConfig, stats: ReadStats) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items())) or "none found"
    return (
        f"source '{src.name}' ({src.uri}) gave no usable samples (skipped: {reasons}); check "
        "that the uri points at webdataset shards or an ImageFolder tree, and `format:`"
    )


# --------------------------------------------------------------------------------------------
# resolving a URI into shards or ImageFolder entries


def resolve(src: SourceConfig, cache_dir: Path, progress: bool) -> tuple[str, list, dict]:
    """(format, shards or image entries, extra metadata) for ``src``."""
    uris = expand_braces(src.uri)
    if len(uris) > 1:
        _expect_format(src, ("auto", "webdataset"), "a brace pattern lists webdataset shards")
        _no_checksum(src, "a brace pattern")
        return "webdataset", _pattern_shards(uris, cache_dir, progress), {}
    loc = parse_uri(uris[0])
    if loc.scheme == "s3" and loc.is_prefix:
        _no_checksum(src, "an s3 prefix")
        return _resolve_s3_prefix(src, loc, cache_dir, progress)
    if loc.scheme in ("http", "https") and src.sha256 is None:
        raise ConfigError(
            f"source '{src.name}': {loc.uri} is a single downloaded file, so it needs a checksum; "
            "add `sha256: <64 hex digits>` to this source in params.yaml (compute it with "
            "`sha256sum` on a copy you trust)"
        )
    path = materialise(loc, cache_dir, sha256=src.sha256, progress=progress)
    extra = {"sha256": src.sha256} if src.sha256 else {}
    if path.is_dir():
        _expect_format(src, ("auto", "webdataset", "imagefolder"), "the uri is a directory")
        return (*_resolve_dir(path, src.format, src.uri), extra)
    return (*_resolve_file(src, path, cache_dir), extra)


def _expect_format(src: SourceConfig, allowed: tuple[str, ...], why: str) -> None:
    if src.format not in allowed:
        raise ConfigError(
            f"source '{src.name}': format '{src.format}' does not fit {src.uri} ({why}); "
            f"use one of {list(allowed)}"
        )


def _no_checksum(src: SourceConfig, what: str) -> None:
    if src.sha256 is not None:
        raise ConfigError(
            f"source '{src.name}': `sha256:` checks one file, but the uri is {what}; remove it"
        )


def _pattern_shards(uris: list[str], cache_dir: Path, progress: bool) -> list[Shard]:
    locs = [parse_uri(u) for u in uris]
    missing = [str(loc.path) for loc in locs if not loc.is_remote and not loc.local.exists()]
    if missing:  # fail before writing anything, naming what is absent
        raise DataError(
            f"{len(missing)} of {len(locs)} shards of the pattern do not exist (first: "
            f"{missing[:3]}); fix the brace range in the source uri or fetch the shards first"
        )
    return [_shard(loc, cache_dir, progress) for loc in locs]


def _shard(loc: Location, cache_dir: Path, progress: bool, stat: RemoteStat | None = None) -> Shard:
    return Shard(loc.uri, partial(materialise, loc, cache_dir, progress=progress, stat=stat))


def _resolve_file(src: SourceConfig, path: Path, cache_dir: Path) -> tuple[str, list]:
    name = parse_uri(src.uri).basename.lower()
    is_archive = name.endswith(ARCHIVE_SUFFIXES) or tarfile.is_tarfile(path)
    if src.format == "webdataset" or (
        src.format == "auto" and name.endswith(".tar") and _looks_like_shard(path)
    ):
        return "webdataset", [Shard(src.uri, lambda: path)]
    if not is_archive:
        raise DataError(
            f"source '{src.name}': {src.uri} is neither a webdataset shard nor a tar/tar.gz "
            "archive; point the uri at shards, an ImageFolder directory, or an archive of either"
        )
    root = extract_archive(path, cache_dir, key=src.sha256)
    fmt = "auto" if src.format == "file" else src.format
    return _resolve_dir(root, fmt, src.uri, descend=True)


def _resolve_dir(root: Path, fmt: str, uri: str, descend: bool = False) -> tuple[str, list]:
    if descend:
        root = _dataset_root(root)
    shards = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    if fmt == "webdataset" or (fmt == "auto" and shards):
        if not shards:
            raise DataError(f"no .tar shards in {root} (from {uri}); check the uri or `format:`")
        return "webdataset", [Shard(str(p), partial(Path, p)) for p in shards]
    return "imagefolder", _local_entries(root, uri)


def _dataset_root(root: Path) -> Path:
    """Skip wrapper folders (``imagenet-r/`` inside ``imagenet-r.tar``) down to the real root."""
    while True:
        children = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(children) != 1 or not children[0].is_dir():
            return root
        inner = [p for p in children[0].iterdir() if not p.name.startswith(".")]
        # A wrapper holds class folders or shards (and maybe a README); a lone class folder
        # holds only images: that is an ImageFolder with one class, so stop there.
        if not any(p.is_dir() or p.name.endswith(SHARD_SUFFIXES) for p in inner):
            return root
        root = children[0]


def _local_entries(root: Path, uri: str) -> list[ImageEntry]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{uri} has no class folders; an ImageFolder tree is <root>/<class>/<image>, and "
            "webdataset shards are *.tar files (set `format:` if the guess is wrong)"
        )
    entries = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(folder).as_posix()
                entries.append(ImageEntry(folder.name, rel, str(path), path.read_bytes))
    return entries


def _resolve_s3_prefix(
    src: SourceConfig, loc: Location, cache_dir: Path, progress: bool
) -> tuple[str, list, dict]:
    _expect_format(src, ("auto", "webdataset", "imagefolder"), "an s3 prefix is a directory")
    objects = s3_list(*loc.s3)
    if not objects:
        raise DataError(
            f"no objects under {loc.uri}; check the prefix (it must end with '/') and list it "
            f"with `aws s3 ls {loc.uri}`"
        )
    shards = [(k, st) for k, st in objects if k.endswith(SHARD_SUFFIXES)]
    if src.format == "webdataset" or (src.format == "auto" and shards):
        if not shards:
            raise DataError(f"no .tar shards under {loc.uri}; check the prefix or `format:`")
        found = [_s3_shard(loc.s3[0], k, st, cache_dir, progress) for k, st in shards]
        return "webdataset", found, {}
    return "imagefolder", _s3_entries(loc, objects, cache_dir), {}


def _s3_shard(bucket: str, key: str, stat: RemoteStat, cache_dir: Path, progress: bool) -> Shard:
    return _shard(parse_uri(f"s3://{bucket}/{key}"), cache_dir, progress, stat)


def _s3_entries(
    loc: Location, objects: list[tuple[str, RemoteStat]], cache_dir: Path
) -> list[ImageEntry]:
    entries = []
    for key, stat in objects:
        parts = key[len(loc.s3[1]) :].split("/", 1)
        if len(parts) < 2 or not parts[1] or parts[0].startswith("."):
            continue  # objects beside the class folders (README, index files)
        obj = parse_uri(f"s3://{loc.bucket}/{key}")
        fetch = partial(materialise, obj, cache_dir, progress=False, stat=stat)
        entries.append(ImageEntry(parts[0], parts[1], obj.uri, partial(_read_path, fetch)))
    return entries


def _read_path(fetch: Callable[[], Path]) -> bytes:
    return fetch().read_bytes()


def _looks_like_shard(path: Path, peek: int = 256) -> bool:
    """A webdataset shard groups several files per key (jpg + txt + json); an archived
    ImageFolder has one image per name inside class folders."""
    exts: dict[str, int] = {}
    with tarfile.open(path, "r:*") as tar:
        for i, member in enumerate(tar):
            if i >= peek:
                break
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and "." in base:  # README.txt alone does not make a shard
                key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                exts[key] = exts.get(key, 0) + 1
    return any(n > 1 for n in exts.values()) or not any("/" in k for k in exts)


# --------------------------------------------------------------------------------------------
# archives


def extract_archive(path: Path, cache_dir: Path, key: str | None = None) -> Path:
    """Extract a tar/tar.gz into ``<cache>/extracted/<sha256>/`` once, refusing unsafe members."""
    digest = key or sha256_file(path)
    dest = Path(cache_dir) / "extracted" / digest[:32]
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                check_member(member, path)
            tar.extractall(tmp, filter="data")  # second line of defence behind check_member
    except tarfile.FilterError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"archive {path} has an unsafe member ({exc}); refusing it") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"archive {path} is corrupt or not a tar/tar.gz ({type(exc).__name__}: {exc}); "
            "delete it (and its cache entry) and fetch it again"
        ) from None
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)
    return dest


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that would land outside the extraction folder or are not plain data."""
    name = member.name
    escapes = name.startswith("/") or ".." in Path(name).parts
    if member.issym() or member.islnk():
        target = member.linkname
        escapes = escapes or target.startswith("/") or ".." in Path(target).parts
    if escapes or member.isdev() or member.isfifo():
        raise DataError(
            f"archive {archive} has an unsafe member '{name}' (absolute path, '..', a link "
            "leaving the archive, or a device); refusing to extract it. Get the archive from "
            "a source you trust"
        )


# --------------------------------------------------------------------------------------------
# labels


@dataclass
class LabelMap:
    """Maps source class names onto output label indices.

    ``space`` is "task" when labels index the task's classes (class_map given, or every source
    class name is a task class), "source" when they index the source's own classes, and
    "none" for unlabelled data.
    """

    classes: list[str] | None
    index: dict[str, int] | None
    space: str
    source_classes: list[str] | None = None
    unmapped: list[str] = field(default_factory=list)
    subset: list[str] | list[int] | None = None  # task class names or indices

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source_classes is not None:
            out["source_classes"] = self.source_classes
        if self.unmapped:
            out["unmapped_classes"] = self.unmapped
        if self.subset is not None:
            # read by validate's coverage suite: a shift may cover only part of the task
            out["class_subset"] = self.subset
        return out


def _map_onto(src: SourceConfig, task: list[str] | None) -> tuple[list[str], dict[str, int]]:
    """Apply ``class_map`` (source name -> task class name); unknown targets are an error."""
    class_map = src.class_map if isinstance(src.class_map, dict) else {}
    targets = list(task) if task else sorted(set(class_map.values()))
    unknown = sorted({v for v in class_map.values() if v not in targets})
    if unknown:
        raise DataError(
            f"source '{src.name}': class_map targets {unknown} are not task classes; fix "
            f"their spelling in params.yaml (task classes include {targets[:8]}...)"
        )
    return targets, {k: targets.index(v) for k, v in class_map.items()}


def folder_label_map(src: SourceConfig, folders: list[str], task: list[str] | None) -> LabelMap:
    if src.classnames is not None and len(src.classnames) != len(folders):
        raise DataError(
            f"source '{src.name}': {len(src.classnames)} classnames for {len(folders)} class "
            "folders; give one name per folder, in sorted folder order, or leave classnames out"
        )
    names = list(src.classnames or folders)
    if src.class_map == imagenet.IMAGENET:
        classes, index, covered = imagenet.label_space(folders, task, src.name)
        unmapped = [f for f in folders if f not in index]
        return LabelMap(classes, index, "task", names, unmapped, covered)
    if src.class_map is not None:
        classes, index = _map_onto(src, task)
        unmapped = [f for f in folders if f not in index]
        subset = sorted({classes[i] for f, i in index.items() if f in folders})
        return LabelMap(classes, index, "task", names, unmapped, subset)
    if task and set(names) <= set(task):  # a shift named like the task: index the task
        index = {f: task.index(n) for f, n in zip(folders, names, strict=True)}
        return LabelMap(list(task), index, "task", subset=sorted(set(names)))
    return LabelMap(names, {f: i for i, f in enumerate(folders)}, "source")


def wds_label_map(src: SourceConfig, task: list[str] | None) -> LabelMap:
    """``cls`` integers are named by ``classnames`` (or by their digits, for class_map keys);
    without either they are taken to index the task's classes already, as clipshift writes."""
    names = src.classnames
    if src.class_map == imagenet.IMAGENET:  # cls holds ImageNet class indices
        classes, index = imagenet.index_space(task, src.name)
        return LabelMap(classes, index, "task")
    if src.class_map is not None:
        classes, index = _map_onto(src, task)
        subset = sorted({classes[i] for i in index.values()})
        return LabelMap(classes, index, "task", names, subset=subset)
    if names is not None:
        if task and set(names) <= set(task):
            index = {n: task.index(n) for n in names}
            return LabelMap(list(task), index, "task", names, subset=sorted(set(names)))
        return LabelMap(list(names), {n: i for i, n in enumerate(names)}, "source", names)
    return LabelMap(list(task) if task else None, None, "task" if task else "none")


def _wds_label(raw: bytes, src_names: list[str] | None, labels: LabelMap) -> int:
    try:
        value = int(raw.decode().strip())
    except ValueError:
        raise SkipSample("bad class index") from None
    if labels.index is None:
        if labels.classes is not None and not 0 <= value < len(labels.classes):
            raise SkipSample("class index out of range")
        return value
    if src_names is not None and not 0 <= value < len(src_names):
        raise SkipSample("class index out of range")
    name = src_names[value] if src_names is not None else str(value)
    if name not in labels.index:
        raise SkipSample("class not in class_map")
    return labels.index[name]


# --------------------------------------------------------------------------------------------
# samples


class KeyMaker:
    """Webdataset-safe, unique, deterministic keys from source keys ('.' and '/' split keys)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def make(self, raw: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "sample"
        key, n = base, 1
        while key in self._used:
            key, n = f"{base}_{n}", n + 1
        self._used.add(key)
        return key


def check_image(data: bytes, ext: str) -> None:
    """Decode fully (truncated files pass a header check) and match the format to the name."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEG: decode at 1/8 scale. Every entropy-coded byte is still read, so truncation
            # and corruption are still caught, for about a third less time.
            image.draft(image.mode, (1, 1))
            image.load()
            fmt = image.format
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes, bombs included
        raise SkipSample("undecodable image") from None
    if PIL_FORMAT.get(ext) != fmt:
        raise SkipSample("image bytes do not match their extension")


def webdataset_samples(
    shards: list[Shard],
    labels: LabelMap,
    stats: ReadStats,
    extra: dict[str, Any],
    require_label: bool,
) -> Iterator[dict[str, Any]]:
    """Checked samples of every shard in order; bad samples and unreadable shards are counted."""
    keys = KeyMaker()
    for shard in shards:
        try:
            path = shard.fetch()
        except DownloadFailed as exc:  # retried already; a store refusing requests stays fatal
            log.warning("skipping shard %s: %s", shard.uri, exc)
            stats.skip("shard download failed")
            extra.setdefault("bad_shards", []).append(shard.uri)
            continue
        try:
            with tarfile.open(path, "r:*") as tar:
                for key, group in group_members(tar):  # raises DataError on unsafe paths
                    try:
                        sample = convert_wds(key, group, shard.uri, labels, require_label)
                    except SkipSample as exc:
                        stats.skip(str(exc))
                        continue
                    stats.read += 1
                    sample["__key__"] = keys.make(key)
                    yield sample
                if _lacks_end_marker(tar, path):
                    raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            stats.skip(f"truncated or unreadable shard ({type(exc).__name__})")
            extra.setdefault("bad_shards", []).append(shard.uri)


def _lacks_end_marker(tar: tarfile.TarFile, path: Path) -> bool:
    """tarfile treats a shard cut at a header boundary as a shorter, valid one; a complete
    uncompressed tar ends with two zero blocks after the last member, so check for them."""
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":  # gzip: truncation already raises EOFError
            return False
    return path.stat().st_size - tar.offset < 2 * tarfile.BLOCKSIZE


def convert_wds(
    key: str, group: dict[str, bytes], uri: str, labels: LabelMap, require_label: bool
) -> dict[str, Any]:
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        odd = any(e in group for e in OTHER_IMAGE_EXTS)
        raise SkipSample("unsupported image type" if odd else "missing image")
    check_image(group[ext], ext)
    caption = _caption(group.get("txt"))
    meta = _metadata(group.get("json"))
    label = _wds_label(group["cls"], _src_names(labels), labels) if "cls" in group else None
    if require_label and label is None:
        raise SkipSample("missing class label")
    sample: dict[str, Any] = {ext: group[ext]}
    if caption is None and label is not None and labels.classes is not None:
        caption = labels.classes[label]
    if caption is not None:
        sample["txt"] = caption
    if label is not None:
        sample["cls"] = label
    sample["json"] = {**meta, "source_uri": uri, "source_key": key}
    return sample


def _src_names(labels: LabelMap) -> list[str] | None:
    return labels.source_classes if labels.index is not None else None


def _caption(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("caption is not utf-8") from None
    if len(text) > MAX_CAPTION_CHARS:
        raise SkipSample(f"caption longer than {MAX_CAPTION_CHARS} chars")
    return text or None


def _metadata(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise SkipSample("bad json metadata") from None
    return value if isinstance(value, dict) else {"metadata": value}


def imagefolder_samples(
    entries: list[ImageEntry], labels: LabelMap, stats: ReadStats, max_samples: int | None
) -> Iterator[dict[str, Any]]:
    """Labelled samples, classes interleaved so that a ``max_samples`` cut keeps every class."""
    index = labels.index or {}
    kept = [e for e in entries if e.folder in index]
    if len(kept) < len(entries):
        stats.reasons["folder not in class_map"] = len(entries) - len(kept)
        stats.skipped += len(entries) - len(kept)
    keys = KeyMaker()
    for entry in _interleave(kept):
        try:
            sample = convert_image_file(entry, labels)
        except SkipSample as exc:
            stats.skip(str(exc))
            continue
        stats.read += 1
        sample["__key__"] = keys.make(f"{entry.folder}/{entry.name.rsplit('.', 1)[0]}")
        yield sample


def _interleave(entries: list[ImageEntry]) -> Iterator[ImageEntry]:
    by_folder: dict[str, list[ImageEntry]] = {}
    for entry in entries:
        by_folder.setdefault(entry.folder, []).append(entry)
    columns = [by_folder[f] for f in sorted(by_folder)]
    for i in range(max((len(c) for c in columns), default=0)):
        yield from (column[i] for column in columns if i < len(column))


def convert_image_file(entry: ImageEntry, labels: LabelMap) -> dict[str, Any]:
    ext = entry.name.rsplit(".", 1)[-1].lower() if "." in entry.name else ""
    if ext not in IMAGE_EXTS:
        raise SkipSample("unsupported image type" if ext in OTHER_IMAGE_EXTS else "not an image")
    data = entry.read()
    check_image(data, ext)
    if labels.index is None or labels.classes is None:
        raise DataError(f"'{entry.uri}': an ImageFolder tree needs class labels (class folders)")
    label = labels.index[entry.folder]
    name = labels.classes[label]
    meta = {"source_uri": entry.uri, "folder": entry.folder, "file": entry.name, "class": name}
    return {ext: data, "txt": name, "cls": label, "json": meta}
