"""Where source data lives: URI parsing and the transports (local, ``s3://``, ``http(s)://``).

Everything remote is materialised into the cache as an ordinary local file (resumable and
verified, see :mod:`clipshift.data.download`), so format readers only ever see local paths.

S3 goes through boto3, which itself honours ``AWS_ENDPOINT_URL_S3`` (any S3-compatible store:
MinIO, moto, Ceph, R2), the usual credential variables and ``AWS_MAX_ATTEMPTS`` /
``AWS_RETRY_MODE``. Errors name the bucket and key and say what to check.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from braceexpand import UnbalancedBracesError, braceexpand  # type: ignore[attr-defined]  # not in its stubs

from clipshift.data.download import CHUNK, RangeResponse, TransientError, download, part_path
from clipshift.data.shards import sha256_file
from clipshift.errors import ConfigError, DataError

REMOTE_SCHEMES = ("s3", "http", "https")
DEFAULT_S3_ATTEMPTS = 5
SERVER_ERROR_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "500", "502", "503", "504")
HTTP_TIMEOUT_S = 60


@dataclass(frozen=True)
class Location:
    """One parsed URI. ``path`` is set for local files, ``bucket``/``key`` for S3."""

    uri: str
    scheme: str  # "file" | "s3" | "http" | "https"
    path: Path | None = None
    bucket: str | None = None
    key: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES

    @property
    def local(self) -> Path:
        """The path of a local location."""
        if self.path is None:
            raise DataError(f"'{self.uri}' is not a local path")
        return self.path

    @property
    def s3(self) -> tuple[str, str]:
        """(bucket, key) of an ``s3://`` location."""
        if self.bucket is None or self.key is None:
            raise DataError(f"'{self.uri}' is not an s3:// URI")
        return self.bucket, self.key

    @property
    def is_prefix(self) -> bool:
        """An S3 'directory' (``s3://bucket/`` or ``s3://bucket/prefix/``) or a local directory."""
        if self.scheme == "s3":
            key = self.s3[1]
            return key == "" or key.endswith("/")
        return self.scheme == "file" and self.local.is_dir()

    @property
    def basename(self) -> str:
        if self.scheme == "file":
            return self.local.name
        tail = self.s3[1] if self.scheme == "s3" else urlsplit(self.uri).path
        return tail.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RemoteStat:
    size: int | None
    etag: str | None


# --------------------------------------------------------------------------------------------
# parsing


def expand_braces(uri: str) -> list[str]:
    """``shard-{000..002}.tar`` -> three URIs (bash rules, as webdataset uses)."""
    try:
        expanded = list(braceexpand(uri))
    except UnbalancedBracesError:
        raise ConfigError(
            f"source uri '{uri}' has unbalanced braces; write shard ranges like "
            "'s3://bucket/{00000..00099}.tar'"
        ) from None
    return expanded or [uri]


def parse_uri(uri: str) -> Location:
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "s3":
        return _parse_s3(uri)
    if scheme in ("http", "https"):
        if not urlsplit(uri).netloc:
            raise ConfigError(f"source uri '{uri}' has no host; write it as https://host/path")
        return Location(uri=uri, scheme=scheme)
    if scheme == "file":
        return Location(uri=uri, scheme="file", path=Path(urlsplit(uri).path))
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ConfigError(
            f"source uri '{uri}' uses the unsupported scheme '{scheme}://'; use a local path, "
            "s3://bucket/key or https://host/path"
        )
    return Location(uri=uri, scheme="file", path=Path(uri).expanduser())


def _parse_s3(uri: str) -> Location:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match:
        raise ConfigError(f"source uri '{uri}' is not s3://bucket/key or s3://bucket/prefix/")
    return Location(uri=uri, scheme="s3", bucket=match.group(1), key=match.group(2))


# --------------------------------------------------------------------------------------------
# local


def require_local(loc: Location) -> Path:
    if not loc.local.exists():
        raise DataError(
            f"source path '{loc.path}' does not exist (resolved from '{Path.cwd()}'). Fix the "
            "`uri:` of this source in params.yaml (relative paths start at the repository "
            "root), or put the data there first"
        )
    return loc.local


# --------------------------------------------------------------------------------------------
# S3


@lru_cache(maxsize=8)
def _client_for(endpoint: str | None, attempts: int, mode: str):
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL_S3 itself; the cache key includes it so tests (and users)
    # who change it in-process get a client for the new endpoint.
    config = Config(
        retries={"mode": mode, "total_max_attempts": attempts},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", config=config)


def s3_client():
    """An S3 client with standard-mode retries (exponential backoff with jitter)."""
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_S3_ATTEMPTS))
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    return _client_for(os.environ.get("AWS_ENDPOINT_URL_S3"), attempts, mode)


def _endpoint_hint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"AWS_ENDPOINT_URL_S3={endpoint}" if endpoint else "AWS (no AWS_ENDPOINT_URL_S3 set)"
    return f"endpoint {where}"


def s3_error(exc: Exception, bucket: str, key: str | None) -> DataError:
    """Turn a boto3/botocore exception into an error that names the object and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    target = f"s3://{bucket}/{key or ''}"
    if isinstance(exc, NoCredentialsError):
        return DataError(
            f"no AWS credentials to read {target}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
        )
    if isinstance(exc, EndpointConnectionError) or _is_connection_error(exc):
        return DataError(
            f"cannot reach the S3 {_endpoint_hint()} to read {target} ({exc}); check that "
            "AWS_ENDPOINT_URL_S3 points at a running S3 server and the network allows it"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return DataError(
                f"S3 bucket '{bucket}' does not exist at {_endpoint_hint()} (needed for "
                f"{target}); check the bucket name in the source uri and AWS_ENDPOINT_URL_S3"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataError(
                f"S3 object {target} not found (bucket '{bucket}', key '{key}'); check the key "
                f"(a prefix must end with '/') and list the bucket: `aws s3 ls s3://{bucket}/`"
            )
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DataError(
                f"access denied to {target} ({code}); check the credentials env vars "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the bucket policy, "
                f"and that {_endpoint_hint()} is the store you mean"
            )
        if code in SERVER_ERROR_CODES or _http_status(exc) >= 500:
            return DataError(
                f"the S3 {_endpoint_hint()} kept failing (HTTP {_http_status(exc) or code}) for "
                f"{target} (bucket '{bucket}', key '{key or ''}') through "
                f"{_attempts(exc)} attempts with backoff; the store is down or overloaded: retry "
                "later, or allow more attempts with AWS_MAX_ATTEMPTS"
            )
        return DataError(f"S3 request for {target} failed ({code}: {exc}); check the uri")
    return DataError(f"S3 request for {target} failed ({type(exc).__name__}: {exc})")


def _http_status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _attempts(exc: Exception) -> int | str:
    response = getattr(exc, "response", None) or {}
    retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
    return retries + 1 if isinstance(retries, int) else "several"


def _is_connection_error(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError

    return isinstance(exc, BotoConnectionError)


def s3_stat(bucket: str, key: str) -> RemoteStat:
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - translated into an actionable DataError
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            _check_bucket(bucket)  # a 404 on HEAD does not say whether the bucket is missing
        raise s3_error(exc, bucket, key) from None
    return RemoteStat(size=head["ContentLength"], etag=head.get("ETag"))


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _check_bucket(bucket: str) -> None:
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise DataError(
                f"S3 bucket '{bucket}' does not exist at {_endpoint_hint()}; check the bucket "
                "name in the source uri and AWS_ENDPOINT_URL_S3"
            ) from None
        raise s3_error(exc, bucket, None) from None


def s3_list(bucket: str, prefix: str) -> list[tuple[str, RemoteStat]]:
    """(key, size and ETag) of every object under ``prefix``, sorted by key."""
    found: list[tuple[str, RemoteStat]] = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                found.append((obj["Key"], RemoteStat(obj["Size"], obj.get("ETag"))))
    except Exception as exc:  # noqa: BLE001
        raise s3_error(exc, bucket, prefix) from None
    return sorted(found)


def _s3_opener(bucket: str, key: str):
    from botocore.exceptions import BotoCoreError, ClientError

    def open_range(offset: int) -> RangeResponse:
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            obj = s3_client().get_object(Bucket=bucket, Key=key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, bucket, key) from None
        start = _range_start(obj.get("ContentRange")) if offset else 0
        total = _range_total(obj.get("ContentRange")) or obj.get("ContentLength")
        body = obj["Body"]
        return RangeResponse(_s3_chunks(body), start, total, body.close)

    return open_range


def _s3_chunks(body) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        yield from body.iter_chunks(CHUNK)
    except (BotoCoreError, Urllib3Error) as exc:  # a dropped stream is worth resuming
        raise TransientError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# HTTP(S)


def http_stat(url: str) -> RemoteStat:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            return RemoteStat(int(length) if length else None, resp.headers.get("ETag"))
    except urllib.error.HTTPError as exc:
        if exc.code in (405, 501):  # HEAD not allowed: sizes will come from the GET
            return RemoteStat(None, None)
        raise _http_error(url, exc) from None
    except OSError as exc:
        raise _unreachable(url, exc) from None


def _http_error(url: str, exc: urllib.error.HTTPError) -> DataError:
    if exc.code == 404:
        return DataError(f"{url} not found (HTTP 404); check the source uri")
    if exc.code in (401, 403):
        return DataError(f"{url} refused access (HTTP {exc.code}); check the uri and its access")
    return DataError(f"{url} answered HTTP {exc.code} {exc.reason}; retry later or check the uri")


def _unreachable(url: str, exc: Exception) -> DataError:
    return DataError(
        f"cannot reach {urlsplit(url).netloc} for {url} ({exc}); check the uri and the "
        "network (proxies: HTTPS_PROXY / HTTP_PROXY)"
    )


def _http_opener(url: str):
    def open_range(offset: int) -> RangeResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            resp = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # asked past the end: the .part is already complete
                total = _range_total(exc.headers.get("Content-Range"))
                if total == offset:
                    return RangeResponse(iter(()), offset, total)
            if exc.code >= 500 or exc.code == 429:
                raise TransientError(f"HTTP {exc.code}") from None
            raise _http_error(url, exc) from None
        except urllib.error.URLError as exc:
            raise TransientError(str(exc.reason)) from None
        content_range = resp.headers.get("Content-Range")
        if resp.status == 206:
            start, total = _range_start(content_range), _range_total(content_range)
        else:
            length = resp.headers.get("Content-Length")
            start, total = 0, int(length) if length else None
        return RangeResponse(_http_chunks(resp), start, total, resp.close)

    return open_range


def _http_chunks(resp) -> Iterator[bytes]:
    while block := resp.read(CHUNK):
        yield block


def _range_start(content_range: str | None) -> int:
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else 0


def _range_total(content_range: str | None) -> int | None:
    match = re.search(r"/(\d+)$", content_range or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# materialising


def materialise(
    loc: Location,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    stat: RemoteStat | None = None,
) -> Path:
    """A local file with the contents of ``loc``: the path itself, or a verified cached download.

    Remote files land in ``<cache>/downloads/<sha256>`` when a checksum is given (content
    addressed: a changed URI with the same content is not downloaded again), otherwise in
    ``<cache>/downloads/<hash of uri>-<name>``, reused while the remote size and ETag are
    unchanged. A ``.version`` file beside each download (and beside its ``.part``) records the
    ETag, so a part-file of an older version of the object is never resumed into a newer one.
    """
    if not loc.is_remote:
        path = require_local(loc)
        if sha256 is not None:
            _check_local_sha(path, sha256)
        return path
    stat = stat or remote_stat(loc)
    dest = cache_path(loc, cache_dir, sha256)
    if dest.exists() and _cached_ok(dest, stat, sha256):
        return dest
    dest.unlink(missing_ok=True)
    part_version = _version_file(part_path(dest))
    _drop_stale_part(dest, stat)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_version.write_text(stat.etag or "")
    download(
        opener(loc),
        dest,
        source=loc.uri,
        expected_sha256=sha256,
        expected_size=stat.size,
        progress=progress,
    )
    os.replace(part_version, _version_file(dest))
    return dest


def remote_stat(loc: Location) -> RemoteStat:
    if loc.scheme == "s3":
        return s3_stat(*loc.s3)
    return http_stat(loc.uri)


def opener(loc: Location):
    if loc.scheme == "s3":
        return _s3_opener(*loc.s3)
    return _http_opener(loc.uri)


def cache_path(loc: Location, cache_dir: Path, sha256: str | None) -> Path:
    downloads = Path(cache_dir) / "downloads"
    if sha256:
        return downloads / sha256
    tag = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", loc.basename) or "file"
    return downloads / f"{tag}-{name}"


def _version_file(path: Path) -> Path:
    return path.with_name(path.name + ".version")


def _drop_stale_part(dest: Path, stat: RemoteStat) -> None:
    part = part_path(dest)
    version = _version_file(part)
    recorded = version.read_text() if version.exists() else None
    if part.exists() and stat.etag and recorded != stat.etag:
        part.unlink()


def _cached_ok(path: Path, stat: RemoteStat, sha256: str | None) -> bool:
    if sha256 is not None:
        return sha256_file(path) == sha256
    version = _version_file(path)
    if stat.etag and (not version.exists() or version.read_text() != stat.etag):
        return False
    return stat.size is None or path.stat().st_size == stat.size


def _check_local_sha(path: Path, expected: str) -> None:
    if path.is_dir():
        raise ConfigError(f"`sha256:` was given for '{path}', which is a directory; remove it")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"sha256 mismatch for '{path}': expected {expected}, got {actual}; replace the "
            "file, or update `sha256:` of this source if the new file is the one you want"
        )
