"""fetch_source end to end on tiny data: webdataset shards (local, S3 pattern and prefix),
ImageFolder trees with class maps, archives over HTTP, corrupt and unsafe inputs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipshift.config import SourceConfig
from clipshift.data.ingest import MAX_CAPTION_CHARS, fetch_source
from clipshift.data.shards import iter_dataset, load_info
from clipshift.data.sources import s3_client, s3_list
from clipshift.errors import ConfigError, DataError

try:
    from s3_server import run_http_server, run_moto_server, use_s3_endpoint
except ImportError:  # tests/ collected as a package
    from tests.s3_server import run_http_server, run_moto_server, use_s3_endpoint


def image_bytes(color: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 255 - color, 40)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def caption_sample(key: str, color: int, ext: str = "png", fmt: str = "PNG"):
    meta = json.dumps({"url": f"http://example.org/{key}.{ext}", "key": key}).encode()
    return [(f"{key}.{ext}", image_bytes(color, fmt)), (f"{key}.txt", b"a red thing"),
            (f"{key}.json", meta)]  # fmt: skip


def make_shards(root: Path) -> list[Path]:
    """Two img2dataset-like shards: 4 good samples and each kind of corrupt sample."""
    root.mkdir(parents=True, exist_ok=True)
    shard0 = [
        *caption_sample("000000000", 10, "jpg", "JPEG"),
        *caption_sample("000000001", 20),
        ("000000002.txt", b"caption without image"),
        ("000000003.png", b"\x89PNG not really"),
        ("000000004.png", image_bytes(30, "JPEG")),  # JPEG bytes behind a .png name
        ("000000005.png", image_bytes(40)),
        ("000000005.txt", b"x" * (MAX_CAPTION_CHARS + 1)),
    ]
    shard1 = [
        *caption_sample("000010000", 50, "webp", "WEBP"),
        *caption_sample("000010001", 60),
        ("000010002.gif", image_bytes(70, "GIF")),
        ("000010003.jpg", image_bytes(80, "JPEG")[:-40]),  # truncated: caught at 1/8 scale too
    ]
    return [write_tar(root / "00000.tar", shard0), write_tar(root / "00001.tar", shard1)]


def shard_hashes(info) -> list[str]:
    return [s.sha256 for s in info.shards]


EXPECTED_SKIPS = {
    "missing image": 1,
    "undecodable image": 2,
    "image bytes do not match their extension": 1,
    f"caption longer than {MAX_CAPTION_CHARS} chars": 1,
    "unsupported image type": 1,
}


@pytest.fixture(scope="module")
def moto_url():
    with run_moto_server() as url:
        yield url


@pytest.fixture
def bucket(moto_url, monkeypatch, tmp_path):
    """A bucket holding the two test shards (plus an img2dataset stats file beside them)."""
    use_s3_endpoint(monkeypatch, moto_url)
    client = s3_client()
    client.create_bucket(Bucket="laion")
    for shard in make_shards(tmp_path / "upload"):
        client.upload_file(str(shard), "laion", f"wds/{shard.name}")
    client.put_object(Bucket="laion", Key="wds/00000_stats.json", Body=b"{}")
    yield "laion"
    for key, _ in s3_list("laion", ""):
        client.delete_object(Bucket="laion", Key=key)
    client.delete_bucket(Bucket="laion")


# --------------------------------------------------------------------------------------------
# webdataset


def test_local_shards_keep_bytes_and_count_corrupt_samples(tmp_path):
    originals = make_shards(tmp_path / "src")
    src = SourceConfig(
        name="pool-web", uri=str(tmp_path / "src" / "{00000..00001}.tar"), role="pool"
    )
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.num_samples == 4 and info.role == "pool"
    assert info.extra["skip_reasons"] == EXPECTED_SKIPS and info.extra["skipped"] == 6
    assert load_info(tmp_path / "out" / "pool-web").num_samples == 4
    with tarfile.open(originals[0]) as tar:
        jpg = tar.extractfile("000000000.jpg").read()
    with tarfile.open(tmp_path / "out" / "pool-web" / info.shards[0].file) as tar:
        names = tar.getnames()
        assert tar.extractfile("000000000.jpg").read() == jpg  # original bytes, not re-encoded
    assert "000010000.webp" in names
    samples = list(iter_dataset(tmp_path / "out" / "pool-web"))
    meta = samples[0]["json"]
    assert meta["url"] == "http://example.org/000000000.jpg" and meta["source_key"] == "000000000"
    assert samples[0]["txt"] == "a red thing" and "cls" not in samples[0]


def test_same_input_gives_same_shard_bytes(tmp_path):
    make_shards(tmp_path / "src")
    src = SourceConfig(name="p", uri=str(tmp_path / "src"), role="pool")
    first = shard_hashes(fetch_source(src, tmp_path / "a", tmp_path / "cache", progress=False))
    second = shard_hashes(fetch_source(src, tmp_path / "b", tmp_path / "cache", progress=False))
    assert first == second


def test_s3_brace_pattern_and_prefix_agree(bucket, tmp_path):
    pattern = SourceConfig(name="pat", uri=f"s3://{bucket}/wds/{{00000..00001}}.tar", role="pool")
    prefix = SourceConfig(name="pre", uri=f"s3://{bucket}/wds/", role="pool")
    a = fetch_source(pattern, tmp_path / "out", tmp_path / "cache", progress=False)
    b = fetch_source(prefix, tmp_path / "out", tmp_path / "cache", progress=False)
    assert a.num_samples == b.num_samples == 4
    assert a.extra["skip_reasons"] == EXPECTED_SKIPS
    assert shard_hashes(a) == shard_hashes(b)  # the stats file beside the shards is ignored


def test_max_samples_stops_downloading(bucket, tmp_path):
    src = SourceConfig(name="few", uri=f"s3://{bucket}/wds/", role="pool", max_samples=2)
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.num_samples == 2
    downloaded = [p.name for p in (tmp_path / "cache" / "downloads").glob("*.tar")]
    assert len(downloaded) == 1 and downloaded[0].endswith("00000.tar")


def test_labelled_shards_mapped_onto_task_classes(tmp_path):
    members = []
    for i, cls in enumerate([0, 1, 2, 0]):
        members += [(f"k{i}.png", image_bytes(i * 30)), (f"k{i}.cls", str(cls).encode())]
    members += [("k9.png", image_bytes(99))]  # no label in a labelled split
    write_tar(tmp_path / "s.tar", members)
    src = SourceConfig(
        name="shift-x", uri=str(tmp_path / "s.tar"), role="shift",
        classnames=["a", "b", "c"], class_map={"a": "cat", "c": "dog"},
    )  # fmt: skip
    info = fetch_source(src, tmp_path / "out", tmp_path / "c", ["ant", "cat", "dog"], False)
    samples = list(iter_dataset(tmp_path / "out" / "shift-x"))
    assert info.classes == ["ant", "cat", "dog"]
    assert [(s["cls"], s["txt"]) for s in samples] == [(1, "cat"), (2, "dog"), (1, "cat")]
    assert info.extra["skip_reasons"] == {"class not in class_map": 1, "missing class label": 1}


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    good, bad = make_shards(tmp_path / "src")
    bad.write_bytes(bad.read_bytes()[:1500])
    src = SourceConfig(name="p", uri=str(tmp_path / "src"), role="pool")
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.num_samples >= 2 and info.extra["bad_shards"] == [str(bad)]
    assert any(r.startswith("truncated or unreadable shard") for r in info.extra["skip_reasons"])


def test_unsafe_member_in_shard_is_rejected(tmp_path):
    write_tar(
        tmp_path / "evil.tar", [("../../evil.png", image_bytes(1)), ("ok.png", image_bytes(2))]
    )
    src = SourceConfig(
        name="evil", uri=str(tmp_path / "evil.tar"), format="webdataset", role="pool"
    )
    with pytest.raises(DataError, match="unsafe member path '../../evil.png'"):
        fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert not (tmp_path / "out" / "evil").exists()
    assert not (tmp_path / "out" / "evil.partial").exists()


# --------------------------------------------------------------------------------------------
# ImageFolder


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (folder, n) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"img{i}.JPEG").write_bytes(image_bytes(c * 40 + i, "JPEG"))
    return root


def test_imagefolder_class_map_subset(tmp_path):
    root = make_folder(tmp_path / "inr", {"n01_cat": 2, "n02_dog": 2, "n03_bird": 2, "n99": 3})
    (root / "n01_cat" / "notes.txt").write_text("not an image")
    class_map = {"n01_cat": "cat", "n02_dog": "dog", "n03_bird": "bird"}
    src = SourceConfig(name="shift-r", uri=str(root), class_map=class_map)
    task = ["ant", "bird", "cat", "dog"]
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", task, progress=False)
    assert info.num_samples == 6 and info.classes == task
    assert info.extra["skip_reasons"] == {"folder not in class_map": 3, "not an image": 1}
    assert info.extra["unmapped_classes"] == ["n99"] and info.extra["label_space"] == "task"
    labels = {
        (s["json"]["folder"], s["cls"], s["txt"])
        for s in iter_dataset(tmp_path / "out" / "shift-r")
    }
    assert labels == {("n01_cat", 2, "cat"), ("n02_dog", 3, "dog"), ("n03_bird", 1, "bird")}


def test_imagefolder_unknown_target_classes_listed(tmp_path):
    root = make_folder(tmp_path / "inr", {"n01": 1, "n02": 1})
    src = SourceConfig(name="s", uri=str(root), class_map={"n01": "kitty", "n02": "doggo"})
    with pytest.raises(DataError, match=r"\['doggo', 'kitty'\] are not task classes"):
        fetch_source(src, tmp_path / "out", tmp_path / "cache", ["cat", "dog"], progress=False)


def test_imagefolder_labels_follow_task_or_own_classes(tmp_path):
    root = make_folder(tmp_path / "f", {"cat": 1, "dog": 2})
    src = SourceConfig(name="s", uri=str(root))
    on_task = fetch_source(src, tmp_path / "o1", tmp_path / "c", ["ant", "cat", "dog"], False)
    assert on_task.extra["label_space"] == "task"
    assert sorted(s["cls"] for s in iter_dataset(tmp_path / "o1" / "s")) == [1, 2, 2]
    named = src.model_copy(update={"classnames": ["Felis", "Canis"]})
    own = fetch_source(named, tmp_path / "o2", tmp_path / "c", None, progress=False)
    assert own.classes == ["Felis", "Canis"] and own.extra["label_space"] == "source"


def test_imagefolder_max_samples_keeps_every_class(tmp_path):
    root = make_folder(tmp_path / "f", {"a": 5, "b": 5, "c": 5})
    src = SourceConfig(name="s", uri=str(root), max_samples=3)
    fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert sorted(s["cls"] for s in iter_dataset(tmp_path / "out" / "s")) == [0, 1, 2]


def test_s3_imagefolder_prefix(bucket, tmp_path):
    client = s3_client()
    for folder in ("cat", "dog"):
        client.put_object(Bucket=bucket, Key=f"inr/{folder}/0.png", Body=image_bytes(5))
    src = SourceConfig(name="s3f", uri=f"s3://{bucket}/inr/", role="test")
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.num_samples == 2 and info.classes == ["cat", "dog"]


# --------------------------------------------------------------------------------------------
# archives, HTTP, errors


def folder_members(prefix: str) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{c}/{i}.png", image_bytes(i + 7 * n)) for n, c in enumerate(["cat", "dog"])
            for i in range(2)]  # fmt: skip


def test_https_archive_of_imagefolder(tmp_path):
    archive = write_tar(tmp_path / "inr.tar.gz", folder_members("imagenet-r/"), "w:gz")
    data = archive.read_bytes()
    with run_http_server() as server:
        server.files["/imagenet-r.tar.gz"] = data
        server.drop_after = len(data) // 2  # resumed transparently
        uri = f"{server.base_url}/imagenet-r.tar.gz"
        src = SourceConfig(name="r", uri=uri, sha256=hashlib.sha256(data).hexdigest())
        info = fetch_source(src, tmp_path / "out", tmp_path / "cache", ["cat", "dog"], False)
        assert info.num_samples == 4 and info.classes == ["cat", "dog"]
        assert info.extra["format"] == "imagefolder" and info.extra["sha256"] == src.sha256
        with pytest.raises(ConfigError, match="add `sha256: "):
            fetch_source(SourceConfig(name="r", uri=uri), tmp_path / "o", tmp_path / "c")


def test_local_plain_tar_of_imagefolder_is_detected(tmp_path):
    readme = [("imagenet-r/README.txt", b"classes are WordNet ids")]
    archive = write_tar(tmp_path / "set.tar", readme + folder_members("imagenet-r/"))
    src = SourceConfig(name="t", uri=str(archive), role="test")
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.extra["format"] == "imagefolder" and info.num_samples == 4


def test_unsafe_archive_member_refused(tmp_path):
    archive = write_tar(
        tmp_path / "a.tar.gz", [*folder_members(""), ("../escape.png", b"x")], "w:gz"
    )
    src = SourceConfig(name="a", uri=str(archive), format="file")
    with pytest.raises(DataError, match="unsafe member '../escape.png'"):
        fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out" / "a").exists()
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def test_missing_local_source_names_path(tmp_path):
    src = SourceConfig(name="gone", uri=str(tmp_path / "imagenet-a"))
    with pytest.raises(DataError, match=r"imagenet-a' does not exist .* Fix the `uri:`"):
        fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)


def test_missing_pattern_shards_fail_before_writing(tmp_path):
    make_shards(tmp_path / "src")
    src = SourceConfig(name="p", uri=str(tmp_path / "src" / "{00000..00003}.tar"), role="pool")
    with pytest.raises(DataError, match="2 of 4 shards of the pattern do not exist"):
        fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()


def test_archive_of_shards(tmp_path):
    shards = make_shards(tmp_path / "src")
    archive = write_tar(tmp_path / "wds.tar.gz", [(p.name, p.read_bytes()) for p in shards], "w:gz")
    src = SourceConfig(name="w", uri=str(archive), format="file", role="pool")
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.extra["format"] == "webdataset" and info.num_samples == 4
