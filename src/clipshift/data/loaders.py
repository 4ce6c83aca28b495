"""Feeding models: labelled sets decoded once, batched normalisation and augmentation, and
image-caption pools either decoded into memory (small pools, exactly resumable order) or
streamed with webdataset (large pools).

Images are kept as uint8 tensors until the last moment and converted, augmented and
normalised a whole batch at a time: no per-image Python runs in the training loop. Every
image goes through :func:`to_rgb` (transparent pixels onto white) so training, zero-shot and
fine-tuning see the same pixels.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from clipshift.data.shards import IMAGE_EXTS, ReadStats, iter_dataset, load_info
from clipshift.errors import DataError

log = logging.getLogger(__name__)

EXCLUDE_FILE = "exclude.json"
# Streamed shards from these schemes are re-read when a read breaks off (see _shard_samples).
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
SHARD_ATTEMPTS = 3
SHARD_BACKOFF_S = 1.0
# RandomResizedCrop-like ranges (open_clip trains with scale (0.9, 1.0)); mild because emoji
# fill the frame and a crop that loses the object changes what the caption describes.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# --------------------------------------------------------------------------------------------
# pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas composited onto white (emoji art is drawn for white pages)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_uint8(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """3×H×W uint8 tensor of an RGB version of ``image``, resized (bicubic) to ``size``²."""
    image = to_rgb(image)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _stats_tensor(values: tuple[float, ...] | list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
    std: tuple[float, ...] = OPENAI_DATASET_STD,
    size: int | None = None,
) -> torch.Tensor:
    """uint8 N×3×H×W (or 3×H×W) → float32 model input, resized to ``size`` if it differs."""
    batch = images.unsqueeze(0) if images.dim() == 3 else images
    x = batch.to(torch.float32).div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    x = (x - _stats_tensor(mean, x.device)) / _stats_tensor(std, x.device)
    return x[0] if images.dim() == 3 else x


def crop_params(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random affine crops (N×2×3), RandomResizedCrop-like, drawn from ``generator`` only."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    scale = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0]
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(scale * ratio).clamp(max=1.0)  # crop side as a fraction of the image side
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * u[:, 2] - 1.0)  # centre in [-1, 1] coordinates, crop stays inside
    cy = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta.to(torch.float32)


def augment(
    images: torch.Tensor,
    theta: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
    std: tuple[float, ...] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """Crop-and-resize a uint8 batch with per-image affine ``theta`` in one grid_sample call,
    then normalise. The output is ``size``² whatever the stored size."""
    x = images.to(torch.float32).div_(255.0)
    if x.shape[-1] >= 2 * size:  # grid_sample does not antialias: shrink large images first
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - _stats_tensor(mean, x.device)) / _stats_tensor(std, x.device)


# --------------------------------------------------------------------------------------------
# labelled sets


@dataclass
class LabelledData:
    images: torch.Tensor  # uint8 N×3×H×W
    labels: torch.Tensor  # int64 N
    keys: list[str]
    classes: list[str] | None = None
    stats: ReadStats = field(default_factory=ReadStats)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: torch.Tensor | list[int]) -> LabelledData:
        index = torch.as_tensor(index, dtype=torch.long)
        return LabelledData(
            self.images[index],
            self.labels[index],
            [self.keys[i] for i in index.tolist()],
            self.classes,
            self.stats,
        )


def read_exclude(validate_dir: str | Path, dataset_name: str) -> set[str]:
    """Keys the validate stage dropped from ``dataset_name`` (leakage, duplicates)."""
    path = Path(validate_dir) / EXCLUDE_FILE
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run the validate stage") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must map dataset names to lists of keys; re-run validate")
    return set(data.get(dataset_name, []))


def decode_samples(
    dataset_dir: str | Path, field: str, size: int | None, exclude: set[str] | None, what: str
) -> tuple[torch.Tensor, list[Any], list[str], ReadStats]:
    """Decode a dataset once: uint8 images at ``size`` (None: the first image's) and each
    sample's ``field`` (``cls``, ``txt``); samples without it are skipped and counted, so are
    unreadable ones. ``what`` names the samples in the error when none is usable."""
    exclude = exclude or set()
    stats = ReadStats()
    images, values, keys = [], [], []
    for sample in iter_dataset(dataset_dir, stats):
        if sample["__key__"] in exclude:
            continue
        if sample.get(field) in (None, ""):
            stats.skip(f"missing {field}")
            continue
        size = size or sample["image"].size[0]
        images.append(image_to_uint8(sample["image"], size))
        values.append(sample[field])
        keys.append(sample["__key__"])
    if not keys:
        raise DataError(
            f"'{dataset_dir}' has no usable {what} (skipped: {stats.reasons}); re-run fetch"
        )
    if stats.skipped:
        log.warning(
            "%s: skipped %d unreadable samples %s", dataset_dir, stats.skipped, stats.reasons
        )
    return torch.stack(images), values, keys, stats


def load_labelled(dataset_dir: str | Path, exclude: set[str] | None = None) -> LabelledData:
    """Decode every sample of a small labelled dataset into memory, once."""
    info = load_info(dataset_dir)
    images, labels, keys, stats = decode_samples(
        dataset_dir, "cls", info.image_size, exclude, "labelled samples"
    )
    return LabelledData(images, torch.tensor(labels, dtype=torch.long), keys, info.classes, stats)


# --------------------------------------------------------------------------------------------
# pools in memory: the order is a pure function of (seed, step)


@dataclass
class PoolTensors:
    images: torch.Tensor  # uint8 N×3×S×S
    tokens: torch.Tensor  # int64 N×context_length
    keys: list[str]
    stats: ReadStats = field(default_factory=ReadStats)

    def __len__(self) -> int:
        return len(self.keys)


def tokenize_captions(tokenizer: Callable, captions: list[str], chunk: int = 4096) -> torch.Tensor:
    parts = [tokenizer(captions[i : i + chunk]) for i in range(0, len(captions), chunk)]
    return torch.cat(parts).to(torch.long)


@dataclass
class CaptionedImages:
    images: torch.Tensor  # uint8 N×3×S×S
    captions: list[str]
    keys: list[str]
    stats: ReadStats


def load_captioned(
    dataset_dir: str | Path, image_size: int | None = None, exclude: set[str] | None = None
) -> CaptionedImages:
    """Decode an image–caption dataset (a pool, the retrieval pairs) once: uint8 images at
    ``image_size`` (default: the dataset's own) and captions."""
    size = image_size or load_info(dataset_dir).image_size
    images, captions, keys, stats = decode_samples(
        dataset_dir, "txt", size, exclude, "image-caption pairs"
    )
    return CaptionedImages(images, captions, keys, stats)


def load_pool(
    dataset_dir: str | Path,
    tokenizer: Callable,
    image_size: int,
    exclude: set[str] | None = None,
) -> PoolTensors:
    """Decode a pool once into uint8 images at the model's size and caption tokens."""
    pairs = load_captioned(dataset_dir, image_size, exclude)
    tokens = tokenize_captions(tokenizer, pairs.captions)
    return PoolTensors(pairs.images, tokens, pairs.keys, pairs.stats)


def _generator(*seeds: int) -> torch.Generator:
    # Mix the seed parts into one 63-bit integer; torch generators take a single int.
    mixed = np.random.SeedSequence([int(s) for s in seeds]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator()
    gen.manual_seed(int(mixed[0]) << 31 ^ int(mixed[1]))
    return gen


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (cached: consecutive steps share it; do not modify)."""
    return torch.randperm(n, generator=_generator(seed, 0xE90C, epoch))


def batch_indices(n: int, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """Sample indices of global batch ``step``: samples ``step*B .. step*B+B-1`` of the stream
    made of one seeded permutation per epoch. Pure in (seed, step), so resuming at any step
    replays exactly what an uninterrupted run would have seen."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, start + batch_size - pos)
        out.append(epoch_permutation(n, seed, epoch)[offset : offset + take])
        pos += take
    return torch.cat(out)


def batch_crops(seed: int, step: int, batch_size: int) -> torch.Tensor:
    return crop_params(batch_size, _generator(seed, 0xA06, step))


# --------------------------------------------------------------------------------------------
# pools streamed with webdataset


def pool_urls(dataset_dir_or_urls: str | Path | list[str]) -> list[str]:
    """Shard URLs of a pool directory (from its dataset.json), or URLs given directly."""
    if isinstance(dataset_dir_or_urls, list):
        return [str(u) for u in dataset_dir_or_urls]
    path = Path(dataset_dir_or_urls)
    if path.is_dir():
        return [str(p) for p in load_info(path).shard_paths(path)]
    return [str(dataset_dir_or_urls)]  # a single URL or a brace pattern webdataset expands


@dataclass
class SkipCounter:
    """webdataset ``handler=``: count, log (the first few) and skip corrupt samples."""

    limit_logged: int = 10
    count: int = 0

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if self.count <= self.limit_logged:
            log.warning("skipping corrupt pool sample (%d so far): %r", self.count, exn)
        return True


def _shard_samples(handler: Callable[[BaseException], bool]) -> Callable:
    """Stage: the raw samples of each shard URL.

    A remote shard (``pipe:``, ``http(s)://``, ``s3://``...) whose read breaks off mid-stream
    is read again, skipping the samples already passed on, up to ``SHARD_ATTEMPTS`` times with
    exponential backoff; then the rest of it is given to ``handler`` (counted and skipped).
    Local files are not re-read (the same bytes would fail the same way): their errors go to
    ``handler`` at once, as in ``wds.tarfile_to_samples``.
    """
    import webdataset as wds

    def stage(src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for item in src:
            url = item["url"]
            if not url.startswith(REMOTE_PREFIXES):
                yield from wds.tarfile_samples([dict(item)], handler=handler)
                continue
            yield from _read_with_retries(url, handler)

    return stage


def _read_with_retries(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    import webdataset as wds

    done = 0
    for attempt in range(SHARD_ATTEMPTS):
        try:
            for i, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                if i >= done:  # a re-read starts over: pass on only what is new
                    done += 1
                    yield sample
            return
        except Exception as exn:  # noqa: BLE001 - any read error: retry, then the handler
            if attempt + 1 < SHARD_ATTEMPTS:
                pause = SHARD_BACKOFF_S * 2**attempt
                log.warning("shard %s broke off (%r); retry in %.1f s", url, exn, pause)
                time.sleep(pause)
                continue
            exn.args = (*exn.args, f"{url}: gave up after {SHARD_ATTEMPTS} attempts")
            handler(exn)


def _worker_identity() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _epoch_shards(urls: list[str], seed: int, epochs: int | None) -> Callable[[], Iterator]:
    """Source stage: the shard list reshuffled (seeded) every epoch, forever unless bounded."""

    def source() -> Iterator[dict[str, str]]:
        epoch = 0
        while epochs is None or epoch < epochs:
            order = list(urls)
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for url in order:
                yield {"url": url}
            epoch += 1

    return source


def _seeded_shuffle(bufsize: int, seed: int, rank: int) -> Callable:
    def stage(src: Iterator) -> Iterator:
        worker, _ = _worker_identity()
        rng = random.Random(seed * 7919 + rank * 104_729 + worker)
        buf: list = []
        for item in src:
            if len(buf) < bufsize:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    return stage


def _decode_pair(
    tokenizer: Callable, image_size: int, do_augment: bool, seed: int, rank: int, with_keys: bool
) -> Callable:
    state: dict[str, torch.Generator] = {}

    def decode(sample: dict[str, Any]) -> tuple:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise DataError(f"pool sample {sample.get('__key__')} lacks an image or a caption")
        image = Image.open(io.BytesIO(sample[ext]))
        image.load()
        pixels = image_to_uint8(image, image_size).unsqueeze(0)
        caption = sample["txt"].decode("utf-8", errors="replace")
        tokens = tokenizer([caption])[0].to(torch.long)  # once per sample, in the worker
        if do_augment:
            if "gen" not in state:  # created lazily so each worker process seeds its own
                state["gen"] = _generator(seed, rank, _worker_identity()[0], 0x5EED)
            pixels = augment(pixels, crop_params(1, state["gen"]), image_size)[0]
        else:
            pixels = normalize(pixels, size=image_size)[0]
        return (pixels, tokens, sample["__key__"]) if with_keys else (pixels, tokens)

    return decode


def pool_dataset(
    dataset_dir_or_urls: str | Path | list[str],
    tokenizer: Callable,
    image_size: int,
    seed: int = 0,
    batch_size: int | None = None,
    shuffle_buffer: int = 2000,
    augment_images: bool = True,
    epochs: int | None = None,
    rank: int = 0,
    handler: Callable[[BaseException], bool] | None = None,
    with_keys: bool = False,
):
    """A webdataset pipeline of (image float tensor, token tensor[, key]), batched if
    ``batch_size``.

    Shards are reshuffled each epoch from ``seed``, split across nodes (``split_by_node``) and
    DataLoader workers (``split_by_worker``); samples pass a seeded shuffle buffer. The stream
    repeats forever unless ``epochs`` is given. Corrupt samples, and the rest of a remote shard
    that keeps breaking off after its retries, are skipped and counted by ``handler`` (a
    :class:`SkipCounter` by default).
    """
    import webdataset as wds

    urls = pool_urls(dataset_dir_or_urls)
    handler = handler or SkipCounter()
    stages = [
        _epoch_shards(urls, seed, epochs),
        wds.split_by_node,
        wds.split_by_worker,
        _shard_samples(handler),
        _seeded_shuffle(shuffle_buffer, seed, rank),
        wds.map(
            _decode_pair(tokenizer, image_size, augment_images, seed, rank, with_keys),
            handler=handler,
        ),
    ]
    if batch_size is not None:
        stages.append(wds.batched(batch_size, partial=False))
    return wds.DataPipeline(*stages)


def pool_loader(
    dataset_dir_or_urls: str | Path | list[str],
    tokenizer: Callable,
    image_size: int,
    batch_size: int,
    seed: int = 0,
    workers: int = 1,
    **kwargs: Any,
):
    """A WebLoader over :func:`pool_dataset`, batched inside the ``workers`` processes."""
    import webdataset as wds

    dataset = pool_dataset(
        dataset_dir_or_urls, tokenizer, image_size, seed=seed, batch_size=batch_size, **kwargs
    )
    return wds.WebLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
