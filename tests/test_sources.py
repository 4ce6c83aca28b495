"""URI parsing and transports against real loopback servers (moto_server S3, an HTTP server)."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from clipshift.data.download import download, part_path
from clipshift.data.sources import (
    _http_opener,
    cache_path,
    expand_braces,
    materialise,
    parse_uri,
    s3_client,
    s3_list,
)
from clipshift.errors import ConfigError, DataError

try:
    from s3_server import free_port, run_http_server, run_moto_server, use_s3_endpoint
except ImportError:  # tests/ collected as a package
    from tests.s3_server import free_port, run_http_server, run_moto_server, use_s3_endpoint

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(scope="module")
def moto_url():
    with run_moto_server() as url:
        yield url


@pytest.fixture
def s3(moto_url, monkeypatch):
    use_s3_endpoint(monkeypatch, moto_url)
    client = s3_client()
    client.create_bucket(Bucket="bkt")
    client.put_object(Bucket="bkt", Key="data/blob.bin", Body=PAYLOAD)
    client.put_object(Bucket="bkt", Key="data/sub/other.bin", Body=b"x")
    yield client
    for key, _ in s3_list("bkt", ""):
        client.delete_object(Bucket="bkt", Key=key)
    client.delete_bucket(Bucket="bkt")


@pytest.fixture
def http():
    with run_http_server() as server:
        server.files["/blob.bin"] = PAYLOAD
        yield server


# --------------------------------------------------------------------------------------------
# parsing


def test_expand_braces_zero_padded_and_plain():
    assert expand_braces("s3://b/p/{00008..00011}.tar") == [
        f"s3://b/p/{i:05d}.tar" for i in range(8, 12)
    ]
    assert expand_braces("/data/a.tar") == ["/data/a.tar"]
    assert expand_braces("x-{a,b}.tar") == ["x-a.tar", "x-b.tar"]
    with pytest.raises(ConfigError, match="unbalanced braces"):
        expand_braces("s3://b/{000..002.tar")


def test_parse_uri_kinds(tmp_path):
    obj = parse_uri("s3://bucket/dir/file.tar")
    assert (obj.scheme, obj.bucket, obj.key, obj.is_prefix) == (
        "s3",
        "bucket",
        "dir/file.tar",
        False,
    )
    assert parse_uri("s3://bucket/dir/").is_prefix and parse_uri("s3://bucket").is_prefix
    assert parse_uri("https://h.org/x/y.tar.gz?dl=1").basename == "y.tar.gz"
    local = parse_uri(str(tmp_path))
    assert local.scheme == "file" and local.is_prefix and not local.is_remote
    with pytest.raises(ConfigError, match="unsupported scheme 'gs://'"):
        parse_uri("gs://bucket/key")


def test_missing_local_path_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope" / "imagenet-r"
    with pytest.raises(DataError) as err:
        materialise(parse_uri(str(missing)), tmp_path / "cache")
    assert str(missing) in str(err.value) and "Fix the `uri:`" in str(err.value)


# --------------------------------------------------------------------------------------------
# HTTP


def test_http_download_resumes_after_dropped_connection(http, tmp_path):
    http.drop_after = 100_000  # the first GET dies part-way; the downloader resumes by Range
    loc = parse_uri(f"{http.base_url}/blob.bin")
    path = materialise(loc, tmp_path, sha256=PAYLOAD_SHA, progress=False)
    assert path == tmp_path / "downloads" / PAYLOAD_SHA
    assert path.read_bytes() == PAYLOAD
    assert http.ranges == [None, "bytes=100000-"]
    assert not part_path(path).exists()


def test_http_resume_across_runs_keeps_part_file(http, tmp_path):
    http.drop_after = 123_456
    dest = tmp_path / "blob.bin"
    opener = _http_opener(f"{http.base_url}/blob.bin")
    with pytest.raises(DataError, match="next run resumes"):
        download(opener, dest, source="blob", retries=0, progress=False)
    assert not dest.exists() and part_path(dest).stat().st_size == 123_456
    download(opener, dest, source="blob", expected_sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and http.ranges[-1] == "bytes=123456-"


def test_server_ignoring_range_restarts_cleanly(http, tmp_path):
    http.drop_after, http.honour_range = 50_000, False
    path = materialise(
        parse_uri(f"{http.base_url}/blob.bin"), tmp_path, sha256=PAYLOAD_SHA, progress=False
    )
    assert path.read_bytes() == PAYLOAD


def test_wrong_sha256_is_clear_and_leaves_no_file(http, tmp_path):
    wrong = "0" * 64
    loc = parse_uri(f"{http.base_url}/blob.bin")
    with pytest.raises(DataError) as err:
        materialise(loc, tmp_path, sha256=wrong, progress=False)
    assert "sha256 mismatch" in str(err.value) and PAYLOAD_SHA in str(err.value)
    assert "update `sha256:`" in str(err.value)
    dest = cache_path(loc, tmp_path, wrong)
    assert not dest.exists() and not part_path(dest).exists()


def test_cached_download_is_reused(http, tmp_path):
    loc = parse_uri(f"{http.base_url}/blob.bin")
    materialise(loc, tmp_path, sha256=PAYLOAD_SHA, progress=False)
    materialise(loc, tmp_path, sha256=PAYLOAD_SHA, progress=False)
    assert http.ranges == [None]  # the second call found the verified file in the cache


def test_http_404_names_url(http, tmp_path):
    with pytest.raises(DataError, match="not found .HTTP 404"):
        materialise(parse_uri(f"{http.base_url}/missing.tar"), tmp_path, progress=False)


# --------------------------------------------------------------------------------------------
# S3


def test_boto3_honours_endpoint_env(s3, moto_url):
    assert s3.meta.endpoint_url == moto_url
    assert s3.meta.config.retries["mode"] == "standard"


def test_s3_download_and_listing(s3, tmp_path):
    path = materialise(parse_uri("s3://bkt/data/blob.bin"), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    listing = [(key, stat.size) for key, stat in s3_list("bkt", "data/")]
    assert listing == [("data/blob.bin", len(PAYLOAD)), ("data/sub/other.bin", 1)]


def test_s3_object_changed_upstream_is_fetched_again(s3, tmp_path):
    loc = parse_uri("s3://bkt/data/blob.bin")
    materialise(loc, tmp_path, progress=False)
    changed = bytes(reversed(PAYLOAD))  # same size: only the ETag tells the versions apart
    s3.put_object(Bucket="bkt", Key="data/blob.bin", Body=changed)
    assert materialise(loc, tmp_path, progress=False).read_bytes() == changed


def test_s3_resumes_part_file(s3, tmp_path):
    loc = parse_uri("s3://bkt/data/blob.bin")
    dest = cache_path(loc, tmp_path, None)
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(PAYLOAD[:77_777])  # left by an interrupted run
    etag = s3.head_object(Bucket="bkt", Key="data/blob.bin")["ETag"]
    part_path(dest).with_name(dest.name + ".part.version").write_text(etag)
    path = materialise(loc, tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and not part_path(dest).exists()


def test_s3_part_of_another_version_is_not_resumed(s3, tmp_path):
    loc = parse_uri("s3://bkt/data/blob.bin")
    dest = cache_path(loc, tmp_path, None)
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"stale bytes of an older object")
    part_path(dest).with_name(dest.name + ".part.version").write_text('"old-etag"')
    assert materialise(loc, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_s3_missing_key_and_bucket_are_named(s3, tmp_path):
    with pytest.raises(DataError) as err:
        materialise(parse_uri("s3://bkt/data/nope.tar"), tmp_path, progress=False)
    assert "bucket 'bkt', key 'data/nope.tar'" in str(err.value)
    with pytest.raises(DataError) as err:
        materialise(parse_uri("s3://no-such-bucket/x.tar"), tmp_path, progress=False)
    assert "bucket 'no-such-bucket' does not exist" in str(err.value)
    assert "AWS_ENDPOINT_URL_S3" in str(err.value)


def test_unreachable_s3_endpoint_fails_fast_and_clearly(monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    use_s3_endpoint(monkeypatch, url, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        materialise(parse_uri("s3://bkt/x.tar"), tmp_path, progress=False)
    assert time.monotonic() - start < 15
    assert "cannot reach the S3 endpoint" in str(err.value) and url in str(err.value)
    assert "s3://bkt/x.tar" in str(err.value)


def test_refused_credentials_say_what_to_check(monkeypatch, tmp_path):
    with run_moto_server(enforce_auth=True) as url:
        use_s3_endpoint(monkeypatch, url)
        with pytest.raises(DataError) as err:
            materialise(parse_uri("s3://bkt/k.tar"), tmp_path, progress=False)
    message = str(err.value)
    assert "access denied to s3://bkt/k.tar" in message and "AWS_ACCESS_KEY_ID" in message
