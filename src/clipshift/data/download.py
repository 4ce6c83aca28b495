"""Resumable, checksummed, atomic downloads, independent of the transport.

A transport (HTTP, S3, ...) only has to say how to open a byte range of a remote object; this
module does the rest, the same way for every transport:

- bytes go to ``<dest>.part``; an interrupted transfer (dropped connection, a killed process)
  resumes from the bytes already there, with a Range request, instead of starting over;
- the finished file is checked against the expected size and sha256, and only then renamed to
  ``dest`` in one step, so a complete file is never confused with a half-written one;
- a checksum mismatch deletes the ``.part`` (its bytes are wrong, resuming them cannot help)
  and raises a :class:`DataError` that names both hashes and the fix.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clipshift.data.shards import sha256_file
from clipshift.errors import DataError

CHUNK = 1 << 20


class TransientError(Exception):
    """A transfer failed in a way that retrying (from the current offset) may fix."""


class DownloadFailed(DataError):
    """A transfer kept breaking (dropped connections, bodies cut short) through every retry;
    the bytes received so far are kept in the ``.part`` file for the next run to resume."""


@dataclass
class RangeResponse:
    """An open response body that starts at byte ``start`` of the object.

    ``start`` is 0 when the server ignored the Range request (then the download restarts);
    ``total`` is the object's full size when the server said so.
    """

    chunks: Iterator[bytes]
    start: int
    total: int | None
    close: Callable[[], None] = lambda: None


# Opens the object from byte ``offset`` on; raises DataError for permanent failures (not found,
# forbidden) and TransientError or OSError for ones worth retrying.
RangeOpener = Callable[[int], RangeResponse]

RETRYABLE = (TransientError, OSError, http.client.HTTPException)


def download(
    open_range: RangeOpener,
    dest: Path,
    *,
    source: str,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    retries: int = 5,
    backoff_s: float = 0.5,
) -> Path:
    """Fetch ``source`` into ``dest`` (resuming ``dest.part``), verify it, publish it atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    _discard_oversized(part, expected_size)
    failures = 0
    with tqdm(
        total=expected_size,
        initial=_size(part),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"download {Path(source).name or source}",
        disable=not progress,
        leave=False,
    ) as bar:
        while True:
            try:
                total = _transfer(open_range, part, expected_size, bar)
                break
            except RETRYABLE as exc:
                failures += 1
                if failures > retries:
                    raise DownloadFailed(
                        f"download of {source} failed {failures} times (last error: {exc}); "
                        f"{_size(part)} bytes are kept in {part} and the next run resumes "
                        "from there; check the network or the server, then run fetch again"
                    ) from None
                time.sleep(backoff_s * 2 ** (failures - 1))
    _verify(part, source, expected_sha256, expected_size if expected_size is not None else total)
    _fsync(part)
    os.replace(part, dest)
    return dest


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _discard_oversized(part: Path, expected_size: int | None) -> None:
    # A .part longer than the object comes from another version of it: resuming would corrupt.
    if expected_size is not None and _size(part) > expected_size:
        part.unlink()


def _transfer(open_range: RangeOpener, part: Path, expected_size: int | None, bar: tqdm) -> int:
    """Append the missing bytes to ``part``; return the object's total size as far as known."""
    offset = _size(part)
    if expected_size is not None and offset == expected_size and part.exists():
        return offset  # already complete: a previous run died between transfer and rename
    response = open_range(offset)
    try:
        if response.start != offset:  # server ignored Range: start over rather than append
            offset = response.start
            bar.reset(total=response.total)
        mode = "r+b" if part.exists() else "wb"
        with open(part, mode) as fh:
            fh.seek(offset)
            fh.truncate()
            for chunk in response.chunks:
                fh.write(chunk)
                bar.update(len(chunk))
        total = response.total if response.total is not None else expected_size
    finally:
        response.close()
    got = _size(part)
    if total is not None and got < total:
        # The body ended early without an error (some servers just close): resume it.
        raise TransientError(f"connection closed after {got} of {total} bytes")
    return got if total is None else total


def _verify(part: Path, source: str, expected_sha256: str | None, size: int | None) -> None:
    got_size = _size(part)
    if size is not None and got_size != size:
        part.unlink()
        raise DataError(
            f"download of {source} has {got_size} bytes, expected {size}; the partial file was "
            "deleted, run fetch again"
        )
    if expected_sha256 is None:
        return
    actual = sha256_file(part)
    if actual != expected_sha256:
        part.unlink()
        raise DataError(
            f"sha256 mismatch for {source}: expected {expected_sha256}, got {actual}. The "
            "download was deleted. If the file changed upstream on purpose, update `sha256:` "
            "of this source in params.yaml; otherwise the server sent corrupt data, retry later"
        )


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
