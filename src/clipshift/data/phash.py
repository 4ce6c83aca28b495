"""Perceptual hashes (DCT pHash, 64 bit) and a fast near-duplicate search between hash sets.

The hash: flatten transparency onto white (emoji art is mostly transparent, and what a model sees
is the drawing, not the hidden colour under alpha 0), convert to grey, resize to 32x32, take the
orthonormal 2-D DCT-II, keep the 8x8 lowest frequencies and set one bit per coefficient that is
above their median. Re-encoding, mild resampling or compression move few bits; different
drawings differ in about half of them.

The search finds all pairs within Hamming distance ``d`` without comparing every pair, by the
pigeonhole principle: split the 64 bits into ``d + 1`` bands; two hashes that differ in at most
``d`` bits agree exactly on at least one band. Exact band matches are cheap (sort + binary
search), and only those candidates are verified. When bands get so narrow that candidates
approach all pairs, a chunked brute force is used instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_SIDE = 8  # 8x8 low-frequency block -> 64 bits
DCT_SIDE = 32  # image side before the DCT
BITS = HASH_SIDE * HASH_SIDE
# Images whose grey levels vary less than this (std, 0-255 scale) have no shape to hash: their
# bits would be rounding noise and every blank image would "match" every other one.
MIN_PIXEL_STD = 1.0


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """First ``keep`` rows of the orthonormal DCT-II matrix of size ``n`` (float64)."""
    k = np.arange(keep)[:, None]
    x = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    mat[0] /= np.sqrt(2.0)
    return mat


_DCT = _dct_rows(DCT_SIDE, HASH_SIDE)


def to_gray(image: Image.Image) -> np.ndarray:
    """The 32x32 float grey image the hash is computed from (alpha flattened onto white)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    gray = image.convert("L").resize((DCT_SIDE, DCT_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.float64)


def hash_grays(grays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of a stack of 32x32 grey images: (uint64 hashes, bool informative)."""
    grays = np.asarray(grays, dtype=np.float64).reshape(-1, DCT_SIDE, DCT_SIDE)
    if len(grays) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    low = (_DCT @ grays @ _DCT.T).reshape(len(grays), BITS)  # batched 2-D DCT, 8x8 corner
    bits = low > np.median(low, axis=1, keepdims=True)
    packed = np.packbits(bits, axis=1, bitorder="big")  # (B, 8) bytes, most significant first
    hashes = packed.view(">u8").reshape(-1).astype(np.uint64)
    informative = grays.reshape(len(grays), -1).std(axis=1) >= MIN_PIXEL_STD
    return hashes, informative


def phash(image: Image.Image) -> int | None:
    """64-bit pHash of one image as an int, or None for a blank (uninformative) image."""
    hashes, informative = hash_grays(to_gray(image)[None])
    return int(hashes[0]) if informative[0] else None


def phash_many(images: Iterable[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of many images at once (one batched DCT): (uint64 hashes, bool informative)."""
    grays = [to_gray(im) for im in images]
    if not grays:
        return hash_grays(np.zeros((0, DCT_SIDE, DCT_SIDE)))
    return hash_grays(np.stack(grays))


# --------------------------------------------------------------------------------------------
# Hamming distance


def _popcount_lut(x: np.ndarray) -> np.ndarray:
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(*x.shape, 8)
    return table[as_bytes].sum(axis=-1, dtype=np.int64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return _popcount_lut(x)


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray | int:
    """Bits that differ between hashes (broadcasts; ints in, int out)."""
    dist = popcount(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
    return int(dist) if dist.ndim == 0 else dist


# --------------------------------------------------------------------------------------------
# near-duplicate search


@dataclass
class Matches:
    """Pairs (query[i], ref[j]) within the distance, sorted by (i, j)."""

    query: np.ndarray  # int64 indices into the query hashes
    ref: np.ndarray  # int64 indices into the reference hashes
    distance: np.ndarray  # int64 Hamming distances

    def __len__(self) -> int:
        return len(self.query)


def _matches(qi: np.ndarray, ri: np.ndarray, dist: np.ndarray) -> Matches:
    order = np.lexsort((ri, qi))
    return Matches(qi[order].astype(np.int64), ri[order].astype(np.int64), dist[order])


def near_duplicates_brute(
    query: np.ndarray, ref: np.ndarray, max_distance: int, chunk_pairs: int = 1 << 22
) -> Matches:
    """All pairs within ``max_distance``, by comparing every pair (in chunks, to bound memory)."""
    query, ref = np.asarray(query, np.uint64), np.asarray(ref, np.uint64)
    step = max(1, chunk_pairs // max(1, len(ref)))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(query), step):
        dist = popcount(query[start : start + step, None] ^ ref[None, :])
        qi, ri = np.nonzero(dist <= max_distance)
        found.append((qi + start, ri, dist[qi, ri]))
    if not found:
        return _matches(*(np.zeros(0, np.int64) for _ in range(3)))
    return _matches(*(np.concatenate(parts) for parts in zip(*found, strict=True)))


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_distance + 1`` bands the 64 bits are split into."""
    n = min(max_distance + 1, BITS)
    widths = [BITS // n + (1 if i < BITS % n else 0) for i in range(n)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths, strict=True)]


def _band_candidates(
    query: np.ndarray, ref: np.ndarray, shift: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that agree exactly on one band: sort the reference band, binary-search each query."""
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    qv = (query >> np.uint64(shift)) & mask
    rv = (ref >> np.uint64(shift)) & mask
    order = np.argsort(rv, kind="stable")
    sorted_rv = rv[order]
    lo = np.searchsorted(sorted_rv, qv, "left")
    counts = np.searchsorted(sorted_rv, qv, "right") - lo
    qi = np.repeat(np.arange(len(query)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return qi, order[np.repeat(lo, counts) + within]


def near_duplicates(
    query: np.ndarray, ref: np.ndarray, max_distance: int, max_candidate_ratio: float = 0.02
) -> Matches:
    """All pairs (query[i], ref[j]) with Hamming distance <= ``max_distance``.

    Same result as :func:`near_duplicates_brute`, usually far faster: candidates come from exact
    band matches (pigeonhole). If the candidates exceed ``max_candidate_ratio`` of all pairs
    (wide distances, or many identical hashes), the brute force is cheaper and is used.
    """
    query, ref = np.asarray(query, np.uint64), np.asarray(ref, np.uint64)
    if len(query) == 0 or len(ref) == 0:
        return near_duplicates_brute(query[:0], ref[:0], max_distance)
    budget = max_candidate_ratio * len(query) * len(ref)
    cand_q, cand_r, total = [], [], 0
    for shift, width in bands(max_distance):
        qi, ri = _band_candidates(query, ref, shift, width)
        total += len(qi)
        if total > budget:
            return near_duplicates_brute(query, ref, max_distance)
        cand_q.append(qi)
        cand_r.append(ri)
    qi, ri = np.concatenate(cand_q), np.concatenate(cand_r)
    # verify first (one XOR + popcount per candidate), de-duplicate the few survivors after:
    # a pair within the distance can match on several bands
    keep = popcount(query[qi] ^ ref[ri]) <= max_distance
    pair_ids = np.unique(qi[keep] * len(ref) + ri[keep])
    qi, ri = pair_ids // len(ref), pair_ids % len(ref)
    return _matches(qi, ri, popcount(query[qi] ^ ref[ri]))
