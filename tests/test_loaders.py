"""Loaders: labelled sets, exclusion, normalisation, augmentation, pools in memory and streamed.

``build_pool``/``build_labelled`` are imported by the other training tests (pytest puts this
directory on sys.path), so every test builds its data the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

import clipshift.models  # noqa: F401  (registers the clipshift-vit-* configs)
from clipshift.data import loaders
from clipshift.data.shards import DatasetInfo, ShardWriter

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
}
SHAPES = ("square", "circle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def toy_image(label: int, rng: random.Random, size: int = 32, mode: str = "RGB") -> Image.Image:
    """A coloured shape on white with a random offset: learnable from pixels, caption-aligned."""
    colour, shape = CLASSES[label].split()
    image = Image.new(mode, (size, size), (255, 255, 255, 0) if mode == "RGBA" else "white")
    draw = ImageDraw.Draw(image)
    r = size // 4 + rng.randint(-2, 2)
    cx, cy = size // 2 + rng.randint(-4, 4), size // 2 + rng.randint(-4, 4)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour] + ((255,) if mode == "RGBA" else ())
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=fill)
    return image


def build_pool(
    root: Path,
    n: int = 64,
    seed: int = 0,
    shard_size: int = 16,
    size: int = 32,
    name: str = "pool-toy",
) -> Path:
    rng = random.Random(seed)
    out = root / name
    info = DatasetInfo(name=name, role="pool", num_samples=0, image_size=size)
    with ShardWriter(out, info, shard_size=shard_size) as writer:
        for i in range(n):
            label = i % len(CLASSES)
            writer.write(
                {
                    "__key__": f"s{i:05d}",
                    "png": toy_image(label, rng, size),
                    "txt": f"a {CLASSES[label]}",
                    "json": {"label": label},
                }
            )
    return out


def build_labelled(
    root: Path, n: int = 24, name: str = "test", size: int = 32, seed: int = 1
) -> Path:
    rng = random.Random(seed)
    out = root / name
    info = DatasetInfo(name=name, role="test", num_samples=0, classes=CLASSES, image_size=size)
    with ShardWriter(out, info, shard_size=10) as writer:
        for i in range(n):
            label = i % len(CLASSES)
            mode = "RGBA" if i % 3 == 0 else "RGB"
            writer.write(
                {
                    "__key__": f"t{i:04d}",
                    "png": toy_image(label, rng, size + 8 * (i % 2), mode),
                    "txt": CLASSES[label],
                    "cls": label,
                }
            )
    return out


def test_load_labelled_decodes_resizes_and_excludes(tmp_path):
    ds = build_labelled(tmp_path)
    data = loaders.load_labelled(ds, exclude={"t0000", "t0005"})
    assert data.images.dtype == torch.uint8 and data.images.shape == (22, 3, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.tolist()[:2] == [1, 2]
    assert data.keys[0] == "t0001" and "t0005" not in data.keys
    assert data.classes == CLASSES
    # transparent background composited onto white, not black
    rgba_index = data.keys.index("t0003")
    assert data.images[rgba_index, :, 0, 0].tolist() == [255, 255, 255]


def test_read_exclude(tmp_path):
    assert loaders.read_exclude(tmp_path, "test") == set()
    (tmp_path / "exclude.json").write_text(json.dumps({"test": ["a", "b"], "val": ["c"]}))
    assert loaders.read_exclude(tmp_path, "test") == {"a", "b"}
    assert loaders.read_exclude(tmp_path, "shift-x") == set()


def test_normalize_matches_open_clip_preprocess(tmp_path):
    rng = random.Random(0)
    image = toy_image(3, rng, 32)
    preprocess = open_clip.image_transform(32, is_train=False)
    expected = preprocess(image)
    got = loaders.normalize(loaders.image_to_uint8(image).unsqueeze(0))[0]
    assert torch.allclose(got, expected, atol=1e-5)
    resized = loaders.normalize(loaders.image_to_uint8(image).unsqueeze(0), size=48)
    assert resized.shape == (1, 3, 48, 48) and resized.dtype == torch.float32


def test_batch_order_is_pure_function_of_seed_and_step():
    n, bs = 50, 16
    steps = [loaders.batch_indices(n, 3, s, bs) for s in range(7)]
    assert torch.equal(steps[5], loaders.batch_indices(n, 3, 5, bs))
    stream = torch.cat(steps)
    # every epoch is a permutation: the first 50 samples cover the pool exactly once
    assert sorted(stream[:n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])
    assert not torch.equal(loaders.batch_indices(n, 4, 0, bs), steps[0])


def test_augment_is_batched_and_seeded():
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    a = loaders.augment(images, loaders.batch_crops(0, 1, 8), 32)
    b = loaders.augment(images, loaders.batch_crops(0, 1, 8), 32)
    c = loaders.augment(images, loaders.batch_crops(0, 2, 8), 32)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(8, 1, 1)
    assert torch.allclose(
        loaders.augment(images, identity, 32), loaders.normalize(images), atol=1e-5
    )


def test_load_pool_tokenizes_once(tmp_path):
    pool = build_pool(tmp_path, n=20)
    tok = open_clip.get_tokenizer("clipshift-vit-micro")
    data = loaders.load_pool(pool, tok, 32)
    assert data.images.shape == (20, 3, 32, 32) and data.tokens.shape == (20, 16)
    assert torch.equal(data.tokens[1], tok(["a red circle"])[0])


def _corrupt_one_sample(pool: Path) -> None:
    shard = pool / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    start = raw.index(b"\x89PNG", 600)  # the second sample's image
    raw[start : start + 40] = b"\x00" * 40
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("workers", [0, 2])
def test_pool_loader_streams_batches_and_skips_corrupt(tmp_path, workers):
    pool = build_pool(tmp_path, n=32, shard_size=8)
    _corrupt_one_sample(pool)
    tok = open_clip.get_tokenizer("clipshift-vit-micro")
    counter = loaders.SkipCounter()
    loader = loaders.pool_loader(
        pool,
        tok,
        32,
        batch_size=8,
        seed=0,
        workers=workers,
        epochs=1,
        shuffle_buffer=10,
        handler=counter,
    )
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    tokens = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert tokens.shape[1] == 16
    # 31 good samples, batches of 8 without partials (each worker drops its own remainder)
    assert 16 <= len(images) <= 24
    if workers == 0:
        assert counter.count == 1
    # deterministic for a given seed
    again = list(
        loaders.pool_loader(
            pool, tok, 32, batch_size=8, seed=0, workers=workers, epochs=1, shuffle_buffer=10
        )
    )
    assert torch.equal(torch.cat([b[1] for b in again]), tokens)


def test_pool_dataset_split_by_node(tmp_path, monkeypatch):
    pool = build_pool(tmp_path, n=32, shard_size=8)
    tok = open_clip.get_tokenizer("clipshift-vit-micro")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = loaders.pool_dataset(
            pool, tok, 32, seed=0, epochs=1, augment_images=False, shuffle_buffer=1, with_keys=True
        )
        seen.append([key for _, _, key in ds])
    # 4 shards of 8: each rank reads 2 whole shards, none twice
    assert len(seen[0]) == len(seen[1]) == 16
    assert not set(seen[0]) & set(seen[1])
