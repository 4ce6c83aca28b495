"""The validate stage on a tiny fetch output built here: clean data passes, planted faults fail."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipshift.config import ValidateConfig
from clipshift.data import tables as tb
from clipshift.data.manifest import manifest_datasets
from clipshift.data.shards import DatasetInfo, ShardWriter, encode_image
from clipshift.errors import ConfigError, DataError, ValidationFailed
from clipshift.stages.validate import load_exclusions, run_validate
from tests.tiny import tree_diff

CLASSES = ["cat", "dog", "owl"]
SIZE = 24
Samples = dict[str, list[dict]]


def art(seed: int) -> Image.Image:
    """A distinct smooth picture per seed (random 8x8 colour grid, upsampled) with some alpha."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgba = np.array(
        Image.fromarray(grid).resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGBA")
    )
    rgba[:2, :, 3] = 0
    return Image.fromarray(rgba)


def png(seed: int) -> bytes:
    return encode_image(art(seed))


def world_samples() -> Samples:
    seeds = iter(range(10_000))
    labelled = {"train": 4, "val": 2, "test": 2, "shift-line": 2, "shift-dark": 2}
    samples: Samples = {}
    for name, per_class in labelled.items():
        samples[name] = [
            {"__key__": f"{name}-{c}-{i}", "png": png(next(seeds)), "txt": CLASSES[c], "cls": c}
            for c in range(len(CLASSES))
            for i in range(per_class)
        ]
    for name, n in {"pool-diverse": 12, "pool-narrow": 12, "retrieval": 6}.items():
        samples[name] = [
            {"__key__": f"{name}-{i}", "png": png(next(seeds)), "txt": f"an emoji of a thing #{i}"}
            for i in range(n)
        ]
    return samples


def role(name: str) -> str:
    return name.split("-")[0] if name.startswith(("shift", "pool")) else name


def write_fetch(
    root: Path, mutate: Callable[[Samples], None] | None = None, extra: dict | None = None
) -> Path:
    samples = world_samples()
    if mutate:
        mutate(samples)
    data = root / "fetch"
    datasets = {}
    for name, rows in samples.items():
        labelled = role(name) not in ("pool", "retrieval")
        info = DatasetInfo(
            name=name,
            role=role(name),
            num_samples=0,
            image_size=SIZE,
            classes=CLASSES if labelled else None,
            extra=(extra or {}).get(name, {}),
        )
        with ShardWriter(data / name, info, shard_size=8) as writer:
            writer.write_all(rows)
        datasets[name] = json.loads(writer.info.model_dump_json())
    (data / "manifest.json").write_text(
        json.dumps({"task": {"classes": CLASSES}, "datasets": datasets})
    )
    return data


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def config(tmp_path: Path, data: Path, **kw) -> ValidateConfig:
    return ValidateConfig(data_dir=str(data), out_dir=str(tmp_path / "validate"), **kw)


def fails(cfg: ValidateConfig, *needles: str) -> str:
    with pytest.raises(ValidationFailed) as info:
        run_validate(cfg, progress=False)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    out = Path(cfg.out_dir)
    assert str(out / "report.json") in message
    assert (out / "data_docs" / "index.html").exists()  # written before raising
    assert json.loads((out / "report.json").read_text())["success"] is False
    return message


def test_clean_world_passes(tmp_path):
    data = write_fetch(tmp_path)
    before = tree_hash(data)
    report = run_validate(config(tmp_path, data, phash_max_distance=4), progress=False)
    assert report.success and not report.failures
    assert tree_hash(data) == before  # fetch's output untouched
    out = tmp_path / "validate"
    assert json.loads((out / "exclude.json").read_text()) == {}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples/train"] == 12 and metrics["samples/pool-diverse"] == 12
    assert metrics["leaked_total"] == 0 and metrics["success"] == 1
    assert metrics["suites_passed"] == metrics["suites_total"] == 8 + 5
    assert all(isinstance(v, int | float) for v in metrics.values())
    html = (out / "data_docs" / "index.html").read_text()
    assert "train.samples" in html and "coverage" in html
    pairs = {(leak.dataset, leak.train_dataset) for leak in report.leaks}
    assert ("test", "pool-diverse") in pairs and ("val", "train") in pairs
    assert ("shift-line", "pool-narrow") in pairs and ("retrieval", "pool-narrow") in pairs
    assert "seconds" not in json.loads((out / "report.json").read_text())


def test_rerun_gives_byte_identical_output_data_docs_included(tmp_path, monkeypatch):
    """data/validate is a DVC output: a re-run (here in another time zone) changes no byte,
    although GX stamps run times, render times and random element ids into Data Docs."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)  # the epoch: no 20xx dates
    data = write_fetch(tmp_path)
    cfg = config(tmp_path, data)
    run_validate(cfg, progress=False)
    first = Path(cfg.out_dir).rename(tmp_path / "first")
    monkeypatch.setenv("TZ", "America/New_York")
    run_validate(cfg, progress=False)
    assert tree_diff(first, Path(cfg.out_dir)) == []
    pages = list((first / "data_docs").rglob("*.html"))
    assert pages and not any(re.search(r"20\d\dT\d{6}", p.read_text()) for p in pages)


def _drop_class(s: Samples) -> None:
    s["shift-line"] = [row for row in s["shift-line"] if row["cls"] != 1]


def _plant_faults(s: Samples) -> None:
    s["pool-narrow"][3]["png"] = png(99_999)[:40]  # truncated PNG
    s["pool-diverse"][2]["txt"] = "  "  # blank caption
    _drop_class(s)  # no 'dog' in one shift
    s["pool-diverse"].append({"__key__": "copied", "png": s["test"][0]["png"], "txt": "copied"})


def _line(message: str, dataset: str) -> str:
    lines = [ln for ln in message.splitlines() if f"dataset '{dataset}'" in ln]
    assert len(lines) == 1, message
    return lines[0]


def test_each_planted_fault_fails_with_dataset_rule_and_count(tmp_path):
    data = write_fetch(tmp_path, _plant_faults)
    before = tree_hash(data)
    msg = fails(config(tmp_path, data, leakage="fail"), "4 rule(s) broken")
    assert "images decode" in _line(msg, "pool-narrow")
    assert "failed on 1 of 12 rows" in _line(msg, "pool-narrow")
    caption = _line(msg, "pool-diverse")
    assert "caption length in [3, 300]" in caption and "failed on 1 of 13 rows" in caption
    assert "pool-diverse-2" in caption
    coverage = _line(msg, "shift-line")
    assert "every task class has at least 1" in coverage and "failed on 1 row (e.g." in coverage
    assert "'dog'" in coverage
    leak = _line(msg, "test")
    assert "no evaluation image is in the training data" in leak and "failed on 1 row (e.g." in leak
    assert "1 in 'pool-diverse' (1 identical bytes, 0 near)" in leak
    assert json.loads((tmp_path / "validate" / "exclude.json").read_text()) == {}
    assert tree_hash(data) == before  # nothing fetch wrote is modified

    # tolerate the corrupt image, drop the leaked test image: only the other two remain
    msg = fails(config(tmp_path, data, leakage="drop", max_corrupt_fraction=0.1), "2 rule(s)")
    assert "pool-narrow" not in msg and "dataset 'test'" not in msg
    assert "dataset 'pool-diverse'" in msg and "dataset 'shift-line'" in msg
    out = tmp_path / "validate"
    assert load_exclusions(out / "exclude.json") == {"test": {"test-0-0"}}
    report = json.loads((out / "report.json").read_text())
    leak = next(x for x in report["leaks"] if x["dataset"] == "test" and x["leaked"])
    assert (leak["train_dataset"], leak["exact"], leak["near"]) == ("pool-diverse", 1, 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded/test"] == 1 and metrics["corrupt/pool-narrow"] == 1
    assert tree_hash(data) == before


def test_declared_class_subset_passes(tmp_path):
    subset = {"shift-line": {"class_subset": ["cat", "owl"]}}
    data = write_fetch(tmp_path, _drop_class, extra=subset)
    assert run_validate(config(tmp_path, data), progress=False).success


def test_reencoded_test_image_is_a_near_duplicate(tmp_path):
    def plant(s: Samples) -> None:
        image = Image.open(io.BytesIO(s["val"][1]["png"]))
        flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
        buf = io.BytesIO()
        flat.save(buf, "JPEG", quality=90)
        s["train"].append({"__key__": "reencoded", "jpg": buf.getvalue(), "txt": "cat", "cls": 0})

    data = write_fetch(tmp_path, plant)
    fails(
        config(tmp_path, data, leakage="fail", phash_max_distance=4),
        "dataset 'val'",
        "failed on 1 row (e.g.",
        "1 in 'train' (0 identical bytes, 1 near)",
    )
    leaks = (tmp_path / "validate" / "leaks.csv").read_text().splitlines()
    assert len(leaks) == 2 and leaks[1].startswith("val,val-0-1,train,reencoded,")
    assert leaks[1].endswith(",False")  # caught by the pHash, not by the bytes


def _with_drawings(s: Samples) -> None:
    """Drawing ids as the built-in world writes them: one design per (class, split family)."""
    for name, rows in s.items():
        for i, row in enumerate(rows):
            drawing = f"{row.get('cls', i)}:{'pool-art' if name.startswith('pool') else name}"
            row["json"] = {"drawing": drawing}


def test_pool_showing_an_evaluation_drawing_fails_even_when_pixels_differ(tmp_path):
    data = write_fetch(tmp_path, _with_drawings)
    assert run_validate(config(tmp_path / "clean", data), progress=False).success

    def contaminate(s: Samples) -> None:
        _with_drawings(s)
        # a new render (other pixels) of the shift's drawing of class 1, twice in one pool
        for row in s["pool-narrow"][:2]:
            row["json"] = {"drawing": "1:shift-line"}

    data = write_fetch(tmp_path / "dirty", contaminate)
    message = fails(config(tmp_path / "dirty", data), "dataset 'pool-narrow'", "drawing")
    assert "1:shift-line" in message and "shift-line" in message
    assert "pool-diverse" not in message.split("drawing", 1)[1].split("\n")[0]
    report = json.loads((tmp_path / "dirty" / "validate" / "report.json").read_text())
    (failure,) = [f for f in report["failures"] if f["suite"] == "drawings"]
    assert failure["dataset"] == "pool-narrow" and failure["rows"] == 1  # one drawing, 2 samples


def test_tampered_shard_fails_manifest_check(tmp_path):
    data = write_fetch(tmp_path)
    shard = data / "retrieval" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])  # drop the end-of-archive blocks and more
    fails(config(tmp_path, data), "dataset 'retrieval'", "shard sha256 matches the manifest")


def test_out_dir_inside_data_dir_is_refused(tmp_path):
    data = write_fetch(tmp_path)
    with pytest.raises(ConfigError, match="never writes into fetch"):
        run_validate(ValidateConfig(data_dir=str(data), out_dir=str(data / "v")), progress=False)


def test_parallel_read_equals_serial(tmp_path):
    data = write_fetch(tmp_path, lambda s: s["train"][5].update(png=b"not an image"))
    _, infos = manifest_datasets(data)
    serial = tb.read_datasets(data, infos, workers=1)
    forked = tb.read_datasets(data, infos, workers=2)
    for a, b in zip(serial, forked, strict=True):
        pd.testing.assert_frame_equal(a.samples, b.samples)
        assert [vars(s) for s in a.shards] == [vars(s) for s in b.shards]
    train = serial[0].samples
    assert train["decodable"].sum() == 11 and train["phash"].isna().sum() == 1
    assert train.loc[5, "error"] == "undecodable image" and train.loc[5, "sha256"] is not None


def test_label_space_and_class_subset():
    task = ["cat", "dog", "owl"]
    info = DatasetInfo(name="s", role="shift", num_samples=0, classes=task)
    assert tb.expected_classes(info, task) == [0, 1, 2]
    info.extra = {"class_subset": ["owl", "cat"]}
    assert tb.expected_classes(info, task) == [0, 2]
    info.extra = {"class_subset": ["wolf"]}
    with pytest.raises(DataError, match="not task classes"):
        tb.expected_classes(info, task)
    own = DatasetInfo(
        name="o", role="shift", num_samples=0, classes=["a", "b"], extra={"label_space": "source"}
    )
    assert tb.label_names(own, task) == ["a", "b"]
