"""Progress bars on long work (tqdm), off where nobody watches (other ranks, tests)."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

BAR_POSITION_ENV = "CLIPSHIFT_BAR_POSITION"  # set per worker by clipshift.parallel


def bar_position() -> int | None:
    """This process's bar line: runs side by side (:mod:`clipshift.parallel`) each draw on
    their own line instead of overwriting one another."""
    value = os.environ.get(BAR_POSITION_ENV, "")
    return int(value) if value.isdigit() else None


def progress_bar(total: int, enabled: bool, desc: str) -> Any | None:
    """A tqdm bar over ``total`` steps, or None when ``enabled`` is false."""
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False, position=bar_position())
