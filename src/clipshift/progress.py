"""Progress bars on long work (tqdm), off where nobody watches (other ranks, tests)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, enabled: bool, desc: str) -> Any | None:
    """A tqdm bar over ``total`` steps, or None when ``enabled`` is false."""
    return tqdm(total=total, desc=desc, leave=False) if enabled else None
