"""pHash: stable under re-encoding, far apart for different pictures; band search == brute force."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipshift.data import phash as ph


def picture(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_identical_images_have_distance_zero():
    a = picture(1)
    assert ph.hamming(ph.phash(a), ph.phash(a.copy())) == 0
    assert ph.phash(a) == ph.phash(a.convert("RGBA"))  # re-encoded, same pixels


def test_transparency_is_flattened_onto_white():
    rgba = np.array(picture(2).convert("RGBA"))
    rgba[:10, :, 3] = 0
    rgba[:10, :, :3] = 0  # hidden colour under alpha 0 must not matter
    image = Image.fromarray(rgba)
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    assert ph.hamming(ph.phash(image), ph.phash(flat)) == 0


def test_small_perturbations_move_few_bits():
    for seed in range(20):
        a = picture(seed)
        h = ph.phash(a)
        assert ph.hamming(h, ph.phash(jpeg(a))) <= 4
        assert ph.hamming(h, ph.phash(a.resize((24, 24)).resize((32, 32)))) <= 6
        assert ph.hamming(h, ph.phash(picture(seed, size=64))) <= 4  # same drawing, other size


def test_different_images_are_far_apart():
    hashes, informative = ph.phash_many(picture(s) for s in range(200))
    assert informative.all()
    dist = ph.hamming(hashes[:, None], hashes[None, :])[np.triu_indices(200, 1)]
    assert dist.min() >= 8
    assert 24 <= dist.mean() <= 40  # about half the bits differ


def test_blank_image_has_no_hash():
    assert ph.phash(Image.new("RGBA", (32, 32))) is None
    assert ph.phash(Image.new("RGB", (16, 16), (200, 10, 10))) is None


def test_popcount_fallback_matches_numpy():
    x = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + 1
    expected = [bin(int(v)).count("1") for v in x]
    assert ph.popcount(x).tolist() == expected
    assert ph._popcount_lut(x).tolist() == expected
    assert ph.hamming(0, 0xFF) == 8 and isinstance(ph.hamming(0, 0xFF), int)


@pytest.mark.parametrize("d", [0, 1, 2, 5, 10, 20, 64])
def test_bands_split_all_bits(d):
    bands = ph.bands(d)
    assert len(bands) == min(d + 1, 64)
    assert sum(w for _, w in bands) == 64
    assert [s for s, _ in bands] == sorted({s for s, _ in bands})


def _hash_sets(seed: int, n_query: int, n_ref: int, max_flips: int):
    rng = np.random.default_rng(seed)
    top = np.uint64(1) << np.uint64(63)
    query = rng.integers(0, 2**63, n_query, dtype=np.uint64) | (
        top * rng.integers(0, 2, n_query).astype(np.uint64)
    )
    ref = rng.integers(0, 2**63, n_ref, dtype=np.uint64)
    # plant near neighbours at every distance up to max_flips, and exact repeats in ref
    for j, i in enumerate(rng.choice(n_query, size=min(n_query, n_ref // 2), replace=False)):
        flips = rng.choice(64, size=j % (max_flips + 1), replace=False)
        ref[j] = query[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    ref[-5:] = ref[:5]
    return query, ref


@pytest.mark.parametrize("d", [0, 1, 3, 6, 10])
def test_band_search_equals_brute_force(d):
    query, ref = _hash_sets(d, 700, 900, max_flips=d + 2)
    brute = ph.near_duplicates_brute(query, ref, d, chunk_pairs=10_000)
    for ratio in (1.0, 0.02):  # 1.0: always the band path; 0.02: may fall back to brute force
        found = ph.near_duplicates(query, ref, d, max_candidate_ratio=ratio)
        assert len(found) == len(brute) > 0
        assert np.array_equal(found.query, brute.query)
        assert np.array_equal(found.ref, brute.ref)
        assert np.array_equal(found.distance, brute.distance)
    assert (brute.distance <= d).all()
    assert (ph.hamming(query[brute.query], ref[brute.ref]) == brute.distance).all()


def test_search_handles_empty_sets():
    assert len(ph.near_duplicates(np.zeros(0, np.uint64), np.arange(5, dtype=np.uint64), 3)) == 0
    assert len(ph.near_duplicates(np.arange(5, dtype=np.uint64), np.zeros(0, np.uint64), 3)) == 0
