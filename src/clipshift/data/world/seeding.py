"""Seeds and styles of the built-in world, shared by its builder and its dataset card.

Every random choice is drawn from a generator seeded by ``derive_seed(seed, dataset, index)``,
so each dataset and each image has its own stream, independent of the others and of order.
"""

from __future__ import annotations

import hashlib

import numpy as np

from clipshift.config import WorldConfig


def derive_seed(seed: int, *parts: object) -> int:
    """A seed unique to (seed, parts): independent streams for every dataset and index.

    63 bits, so it fits the int64 columns that pandas / Great Expectations read metadata into.
    """
    text = "/".join(str(p) for p in ("clipshift-world", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


def styles_in_use(world: WorldConfig) -> list[str]:
    styles = [world.reference_style, *world.shift_styles, *world.diverse_styles]
    return list(dict.fromkeys([*styles, *world.narrow_styles]))
