"""The fetch stage's output is a DVC output: byte-deterministic, with run facts kept out of it.

Re-running fetch on the same configuration must give the same ``data/fetch`` hash, or every
downstream stage is invalidated: timings and what an earlier run left behind go to
``metrics/fetch.json`` (the returned facts), never into the manifest, dataset.json or the card.
"""

from __future__ import annotations

import json

from clipshift.config import FetchConfig
from clipshift.data.manifest import MANIFEST, read_manifest
from clipshift.stages.fetch import RUN_FACTS, fetch_metrics, run_fetch
from tests.tiny import ART_CACHE, TINY_WORLD, tree_diff, tree_hash


def fetch_into(out, **overrides) -> dict:
    cfg = FetchConfig(world=TINY_WORLD, out_dir=str(out), cache_dir=str(ART_CACHE), **overrides)
    return run_fetch(cfg, progress=False)


def test_fetch_twice_gives_byte_identical_output(tmp_path):
    first = fetch_into(tmp_path / "a")
    second = fetch_into(tmp_path / "b")
    assert tree_diff(tmp_path / "a", tmp_path / "b") == []
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    # the run facts come back (for metrics/fetch.json) but are not in the output
    for result in (first, second):
        assert result["fetch_seconds"] > 0 and result["world_build_seconds"] > 0
        assert result["removed_stale"] == []
    written = read_manifest(tmp_path / "a")
    assert not set(RUN_FACTS) & set(written)
    assert written == {k: v for k, v in first.items() if k not in RUN_FACTS}
    assert "seconds" not in (tmp_path / "a" / MANIFEST).read_text()
    metrics = fetch_metrics(first)
    assert metrics["fetch_seconds"] == first["fetch_seconds"]
    assert metrics["world_build_seconds"] == first["world_build_seconds"]
    assert metrics["samples"]["pool-diverse"] == TINY_WORLD["pool_size"]


def test_refetch_over_an_older_output_gives_the_fresh_bytes(tmp_path):
    """What an earlier run left (a dataset of a source no longer configured) is removed and
    reported, and leaves no trace: the output equals a fresh fetch's."""
    fetch_into(tmp_path / "fresh")
    fetch_into(tmp_path / "reused", seed=1)
    stale = tmp_path / "reused" / "old-source"
    (tmp_path / "reused" / "train").rename(stale)
    info = json.loads((stale / "dataset.json").read_text())
    info.update(name="old-source", source="/data/old")  # an external source, since removed
    (stale / "dataset.json").write_text(json.dumps(info))
    again = fetch_into(tmp_path / "reused")
    assert again["removed_stale"] == ["old-source"]
    assert tree_diff(tmp_path / "fresh", tmp_path / "reused") == []
