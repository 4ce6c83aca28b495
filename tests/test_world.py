"""The built-in emoji world: layout, coverage, captions, determinism, seeds, and its errors.

Most tests use the styles shipped in PyPI wheels (twemoji, openmoji, noto_line and the derived
ones), so they need nothing beyond the venv. The npm styles are tested once, with the art
installed (once per session, into the repository's cache) by ``ensure_npm_art``; that test is
skipped when npm cannot provide it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipshift.config import FetchConfig
from clipshift.data.shards import iter_dataset, load_info, sha256_file
from clipshift.data.world import build_world, select_classes
from clipshift.data.world.art import ArtLibrary, ensure_npm_art
from clipshift.data.world.build import (
    DEFAULT_GROUP_CAP,
    GROUP_CAPS,
    class_group,
    emoji_universe,
    pool_universe,
    world_plan,
)
from clipshift.data.world.captions import load_catalog, make_caption
from clipshift.data.world.render import render
from clipshift.errors import DataError
from clipshift.tracking_api import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
PYPI_WORLD = {
    "num_classes": 6,
    "train_per_class": 2,
    "val_per_class": 2,
    "test_per_class": 2,
    "shift_per_class": 2,
    "pool_size": 40,
    "retrieval_size": 12,
    "image_size": 32,
    "shard_size": 16,
    "caption_noise": 0.3,
    "reference_style": "twemoji",
    "shift_styles": ["openmoji", "silhouette", "grayscale", "corrupt"],
    # noto_line is the one PyPI style no evaluation set uses: the task classes are drawn in it
    "diverse_styles": ["twemoji", "openmoji", "noto_line"],
    "narrow_styles": ["twemoji", "noto_line"],
}
LABELLED = ["train", "val", "test"] + [f"shift-{s}" for s in PYPI_WORLD["shift_styles"]]


def make_cfg(cache: Path, seed: int = 0, **world) -> FetchConfig:
    return FetchConfig(seed=seed, cache_dir=str(cache), world={**PYPI_WORLD, **world})


def samples(root: Path, name: str) -> list[dict]:
    return list(iter_dataset(root / name))


def shard_hashes(root: Path, result: dict) -> dict[str, list[str]]:
    return {
        name: [sha256_file(p) for p in load_info(root / name).shard_paths(root / name)]
        for name in result["datasets"]
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, Path]:
    """One tiny world (seed 0), built with a cold art cache."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("world")
    tracker = RecordingTracker()
    result = build_world(make_cfg(cache), out, tracker=tracker, progress=False)
    assert tracker.metrics and tracker.artifacts  # counts and the card were logged
    return out, result, cache


def test_counts_roles_and_manifest(built):
    out, result, _ = built
    expected = {name: 6 * 2 for name in LABELLED}
    expected |= {"pool-diverse": 40, "pool-narrow": 40, "retrieval": 12}
    assert {n: d["num_samples"] for n, d in result["datasets"].items()} == expected
    for name, count in expected.items():
        info = load_info(out / name)
        assert info.num_samples == count == len(samples(out, name))
        assert sum(s.num_samples for s in info.shards) == count
    assert load_info(out / "shift-corrupt").role == "shift"
    assert load_info(out / "pool-narrow").role == "pool"
    assert load_info(out / "retrieval").role == "retrieval"
    assert len(load_info(out / "pool-diverse").shards) == 3  # 40 samples / 16 per shard
    task = result["task"]
    assert len(task["classes"]) == len(set(task["classes"])) == 6
    assert task["reference_style"] == "twemoji"
    assert set(result["styles"]) == {
        "twemoji",
        "openmoji",
        "noto_line",
        "silhouette",
        "grayscale",
        "corrupt",
    }
    assert result["styles"]["openmoji"]["license"] == "CC-BY-SA-4.0"
    assert result["styles"]["twemoji"]["license"] == "CC-BY-4.0"
    assert result["styles"]["silhouette"]["derived_from"] == "twemoji"
    assert result["build_seconds"] > 0


def test_every_class_in_every_labelled_set(built):
    out, result, _ = built
    classes = result["task"]["classes"]
    for name in LABELLED:
        rows = samples(out, name)
        assert Counter(r["cls"] for r in rows) == {i: 2 for i in range(6)}
        style = "twemoji" if name in ("train", "val", "test") else name.removeprefix("shift-")
        for row in rows:
            assert row["txt"] == classes[row["cls"]] == row["json"]["name"]
            assert row["json"]["style"] == style and row["json"]["split"] == name
            assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert load_info(out / "train").classes == classes


def test_pools_cover_the_universe_and_differ_only_in_style(built):
    out, result, _ = built
    diverse, narrow = samples(out, "pool-diverse"), samples(out, "pool-narrow")
    task = set(result["task"]["codepoints"])
    codes = [r["json"]["codepoint"] for r in diverse]
    assert len(set(codes)) == 40  # one pass over a 1000+ universe: no repeats
    assert set(codes) - task, "pools must hold emoji that are not task classes"
    assert {r["json"]["style"] for r in narrow} == {"twemoji", "noto_line"}
    assert {r["json"]["style"] for r in diverse} == {"twemoji", "openmoji", "noto_line"}
    # task classes only in the style no evaluation set draws them in
    for row in diverse + narrow:
        if row["json"]["codepoint"] in task:
            assert row["json"]["style"] == "noto_line"
    # same content stream: the same emoji at the same index, different images
    assert codes == [r["json"]["codepoint"] for r in narrow]
    assert [r["image_bytes"] for r in diverse] != [r["image_bytes"] for r in narrow]


def test_captions_are_varied_bounded_and_partly_noisy(built):
    out, _, _ = built
    rows = samples(out, "pool-diverse") + samples(out, "pool-narrow")
    captions = [r["txt"] for r in rows]
    assert all(3 <= len(c) <= 200 and c.strip() == c for c in captions)
    assert len(set(captions)) > 0.5 * len(captions)
    kinds = Counter(r["json"]["caption_kind"] for r in rows)
    assert kinds["clean"] > 0 and sum(kinds.values()) - kinds["clean"] > 0
    named = sum(r["json"]["name"] in r["txt"] for r in rows if r["json"]["caption_kind"] == "clean")
    assert named > 0.5 * kinds["clean"]  # clean captions mostly say what the emoji is
    retrieval = samples(out, "retrieval")
    assert {r["json"]["caption_kind"] for r in retrieval} == {"clean"}


def test_no_pool_holds_a_drawing_that_an_evaluation_set_shows(built):
    out, result, _ = built
    roles = {name: load_info(out / name).role for name in result["datasets"]}
    held = {
        r["json"]["drawing"]
        for name, role in roles.items()
        if role != "pool"
        for r in samples(out, name)
    }
    pooled = {
        r["json"]["drawing"] for name in ("pool-diverse", "pool-narrow") for r in samples(out, name)
    }
    assert held and pooled and not held & pooled
    # derived styles are re-renders of the reference's drawings
    silhouettes = {r["json"]["drawing"] for r in samples(out, "shift-silhouette")}
    assert silhouettes == {r["json"]["drawing"] for r in samples(out, "test")}
    # retrieval shows non-task emoji in pool styles, drawings no pool holds
    retrieval = samples(out, "retrieval")
    assert not {r["json"]["codepoint"] for r in retrieval} & set(result["task"]["codepoints"])


def test_shift_groups_follow_the_pools(built):
    out, _, _ = built
    groups = {
        s: load_info(out / f"shift-{s}").extra["shift_group"] for s in PYPI_WORLD["shift_styles"]
    }
    assert groups == {
        "openmoji": "natural-covered",
        "silhouette": "synthetic",
        "grayscale": "synthetic",
        "corrupt": "synthetic",
    }
    assert "shift_group" not in load_info(out / "test").extra


def test_pools_without_a_style_free_of_evaluation_drawings_are_refused():
    # twemoji draws the reference sets: a twemoji-only pool could show the task classes only
    # in the very drawings the test holds
    world = make_cfg(Path("unused"), narrow_styles=["twemoji"]).world
    catalog = load_catalog()
    universe = sorted(catalog)[:20]
    with pytest.raises(DataError, match="pool 'pool-narrow' cannot draw") as err:
        world_plan(world, 0, universe[:6], universe, catalog)
    assert "emojione" in str(err.value)  # names the fix


def test_caption_generator_never_returns_empty_text():
    catalog = load_catalog()
    names = [m.name for m in catalog.values()]
    rng = np.random.default_rng(0)
    metas = list(catalog.values())
    kinds = Counter()
    for i in range(600):
        text, kind = make_caption(metas[i % len(metas)], "noto_line", rng, 1.0, names)
        kinds[kind] += 1
        assert 3 <= len(text) <= 200
    assert len(kinds) == 7  # every corruption kind occurs


def test_image_seeds_never_repeat_across_datasets(built):
    out, result, _ = built
    seeds = [r["json"]["seed"] for name in result["datasets"] for r in samples(out, name)]
    assert len(seeds) == len(set(seeds))


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    out, result, cache = built
    again = build_world(make_cfg(cache), tmp_path / "again", progress=False)  # warm art cache
    assert shard_hashes(out, result) == shard_hashes(tmp_path / "again", again)
    for name in ("README.md", "contact_sheet.png"):
        assert sha256_file(out / "card" / name) == sha256_file(tmp_path / "again" / "card" / name)
    other = build_world(make_cfg(cache, seed=1), tmp_path / "other", progress=False)
    first, second = shard_hashes(out, result), shard_hashes(tmp_path / "other", other)
    assert all(first[name] != second[name] for name in first)


def test_rebuild_removes_datasets_the_config_no_longer_makes(tmp_path):
    cfg = make_cfg(tmp_path / "cache", num_classes=2, pool_size=10, retrieval_size=10)
    build_world(cfg, tmp_path / "w", progress=False)
    (tmp_path / "w" / "mine").mkdir()  # not a world dataset: must survive
    cfg.world.shift_styles = ["silhouette"]
    build_world(cfg, tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "shift-openmoji").exists()
    assert (tmp_path / "w" / "shift-silhouette").exists() and (tmp_path / "w" / "mine").exists()


def test_card_has_attributions_and_a_contact_sheet(built):
    out, result, _ = built
    text = (out / "card" / "README.md").read_text()
    for needle in (
        "CC BY-SA 4.0",
        "CC-BY 4.0",
        "OpenMoji",
        "Twitter",
        "Open Font License",
        "pool-diverse",
        result["task"]["classes"][0],
    ):
        assert needle in text
    sheet = Image.open(out / "card" / "contact_sheet.png")
    assert sheet.width > 6 * 96 and sheet.height > 6 * 96


def test_class_choice_is_seeded_distinct_and_spread(tmp_path):
    catalog = load_catalog()
    lib = ArtLibrary(["twemoji", "openmoji", "noto_line"], tmp_path, 64)
    universe = emoji_universe(lib, catalog, lib.styles)
    assert len(universe) > 1000
    first = select_classes(universe, catalog, 100, seed=0)
    assert first == select_classes(universe, catalog, 100, seed=0)
    assert first != select_classes(universe, catalog, 100, seed=1)
    groups = Counter(class_group(catalog[k]) for k in first)
    assert all(n <= GROUP_CAPS.get(g, DEFAULT_GROUP_CAP) for g, n in groups.items())
    assert not any("clock" in catalog[k].name or "button" in catalog[k].name for k in first)
    with pytest.raises(DataError, match="num_classes"):
        select_classes(universe, catalog, len(universe) + 1, seed=0)


def test_pool_universe_keeps_every_task_class_and_is_seeded():
    universe = [f"e{i:04d}" for i in range(1000)]
    classes = universe[::100]  # 10 task classes spread over the universe
    small = pool_universe(universe, classes, 50, seed=0)
    assert len(small) == 50 and set(classes) <= set(small)
    assert small == [k for k in universe if k in set(small)]  # universe order kept
    assert small == pool_universe(universe, classes, 50, seed=0)
    assert small != pool_universe(universe, classes, 50, seed=1)
    assert pool_universe(universe, classes, None, seed=0) == universe
    assert pool_universe(universe, classes, 5000, seed=0) == universe


def test_pool_universe_below_the_task_is_a_config_error():
    with pytest.raises(ValueError, match="pool_universe=50 is below num_classes=100"):
        FetchConfig.model_validate({"world": {"num_classes": 100, "pool_universe": 50}})


def test_render_styles(tmp_path):
    lib = ArtLibrary(["twemoji"], tmp_path, 64)
    art = lib.art("twemoji", "1f34e")
    a, params = render(art, "corrupt", 32, np.random.default_rng(3))
    b, _ = render(art, "corrupt", 32, np.random.default_rng(3))
    assert a.tobytes() == b.tobytes() and params["corruption"] and 1 <= params["severity"] <= 5
    gray, _ = render(art, "grayscale", 32, np.random.default_rng(4))
    x = np.asarray(gray)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()
    sil, params = render(art, "silhouette", 48, np.random.default_rng(5))
    assert sil.size == (48, 48) and max(params["silhouette_rgb"]) <= 80


def test_missing_npm_gives_a_clear_error(tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    cfg = make_cfg(tmp_path / "empty-cache", shift_styles=["fluent"])
    with pytest.raises(DataError) as err:
        build_world(cfg, tmp_path / "w", progress=False)
    message = str(err.value)
    assert "npm" in message and "@iconify-json/fluent-emoji-flat" in message
    assert "install" in message  # the fix
    assert not (tmp_path / "w" / "train").exists()


@pytest.fixture(scope="session")
def npm_cache() -> Path:
    """The npm art, installed once into the repository's cache (skip if npm cannot)."""
    cache = REPO / ".cache" / "clipshift"
    try:
        ensure_npm_art(
            cache,
            [
                "@iconify-json/fluent-emoji-flat",
                "@iconify-json/noto",
                "@iconify-json/fluent-emoji-high-contrast",
                "@iconify-json/emojione",
                "@iconify-json/emojione-v1",
                "@iconify-json/fxemoji",
            ],
        )
    except DataError as exc:
        pytest.skip(f"npm art unavailable: {exc}")
    return cache


def test_npm_styles_render(npm_cache, tmp_path):
    cfg = FetchConfig(
        cache_dir=str(npm_cache),
        world={
            **PYPI_WORLD,
            "num_classes": 3,
            "pool_size": 12,
            "retrieval_size": 10,
            "shift_styles": ["fluent", "noto", "fluent_line"],
            "diverse_styles": ["twemoji", "noto", "emojione", "fxemoji"],
            "narrow_styles": ["twemoji", "emojione_v1"],
        },
    )
    result = build_world(cfg, tmp_path, progress=False)
    assert result["styles"]["fluent"]["license"] == "MIT"
    assert result["styles"]["noto"]["license"] == "Apache-2.0"
    assert result["styles"]["emojione"]["license"] == "CC-BY-4.0"
    assert result["styles"]["fxemoji"]["license"] == "Apache-2.0"
    groups = {
        s: load_info(tmp_path / f"shift-{s}").extra["shift_group"]
        for s in ("fluent", "noto", "fluent_line")
    }
    assert groups == {
        "fluent": "natural-unseen",
        "noto": "natural-covered",
        "fluent_line": "natural-unseen",
    }
    task = set(result["task"]["codepoints"])
    for row in samples(tmp_path, "pool-diverse"):
        if row["json"]["codepoint"] in task:  # noto is a shift: its drawings stay out
            assert row["json"]["style"] in ("emojione", "fxemoji")
    for name in ("shift-fluent", "shift-noto", "shift-fluent_line"):
        rows = samples(tmp_path, name)
        assert len(rows) == 6 and all(r["image"].size == (32, 32) for r in rows)
        assert json.dumps(rows[0]["json"])  # metadata is plain JSON
