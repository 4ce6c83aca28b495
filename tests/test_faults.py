"""Fault injection (issue 5, reliability): a full disk under shards and checkpoints, an S3
endpoint answering 503 or cutting bodies short, two runs at once on the same outputs and MLflow
server, the MLflow server restarting under training, malformed samples.

Servers are real and on loopback (moto_server behind a small fault-injecting HTTP proxy,
``mlflow server`` on SQLite); a monkeypatch only ever injects the fault itself (ENOSPC at one
write), never stands in for a service.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import http.server
import io
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipshift import checkpoints as ckpt
from clipshift import tracking
from clipshift.config import PretrainConfig, SourceConfig
from clipshift.data import download as download_mod
from clipshift.data.ingest import MAX_CAPTION_CHARS, fetch_source
from clipshift.data.shards import DatasetInfo, ShardWriter, iter_dataset, load_info, sha256_file
from clipshift.data.sources import materialise, parse_uri, s3_client
from clipshift.errors import CheckpointError, ClipshiftError, ConfigError, DataError
from clipshift.stages.pretrain import TrainHooks, run_pretrain
from clipshift.tracking_api import RecordingTracker
from tests.s3_server import DUMMY_CREDS, free_port, run_moto_server, use_s3_endpoint
from tests.test_loaders import build_pool
from tests.tiny import ART_CACHE, TINY_WORLD, toy_pretrain_cfg, toy_pretrain_world

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "clipshift-test-faults-w32"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def leftovers(root: Path) -> list[str]:
    """Temp files, partial directories and locks that a clean failure must not leave."""
    names = [p.name for p in root.rglob("*")]
    return [n for n in names if n.endswith((".tmp", ".partial", ".lock", ".old"))]


# ============================================================================================
# 1. disk full


def _samples(prefix: str, n: int = 12) -> list[dict]:
    rng = random.Random(prefix)
    return [
        {
            "__key__": f"{prefix}{i:03d}",
            "png": Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))),
            "txt": f"sample {prefix} {i}",
        }
        for i in range(n)
    ]


def _write_dataset(out: Path, prefix: str) -> DatasetInfo:
    info = DatasetInfo(name=out.name, role="pool", num_samples=0, image_size=16)
    with ShardWriter(out, info, shard_size=5) as writer:
        writer.write_all(_samples(prefix))
    return info


def _assert_dataset_is(out: Path, expected: DatasetInfo, prefix: str) -> None:
    info = load_info(out)
    assert info == expected
    for shard in info.shards:
        assert sha256_file(out / shard.file) == shard.sha256
    keys = [s["__key__"] for s in iter_dataset(out)]
    assert keys == [f"{prefix}{i:03d}" for i in range(12)]


def fail_after(real, n: int):
    """``real``, except that every call after the first ``n`` raises ENOSPC (a plain function,
    so it also works patched in as a method)."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] > n:
            raise enospc()
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("point", ["member write", "shard fsync", "dataset.json", "new shard file"])
def test_disk_full_while_writing_shards(tmp_path, monkeypatch, point):
    out = tmp_path / "data" / "pool-x"
    before = _write_dataset(out, "old")
    if point == "member write":  # the 13th tar member (in the second shard) hits a full disk
        monkeypatch.setattr(tarfile.TarFile, "addfile", fail_after(tarfile.TarFile.addfile, 12))
    elif point == "shard fsync":  # delayed allocation: ENOSPC surfaces at fsync
        monkeypatch.setattr(os, "fsync", fail_after(os.fsync, 1))
    elif point == "dataset.json":
        monkeypatch.setattr(Path, "write_text", fail_after(Path.write_text, 0))
    else:
        monkeypatch.setattr(tarfile, "open", fail_after(tarfile.open, 1))
    with pytest.raises(DataError) as err:
        _write_dataset(out, "new")
    monkeypatch.undo()
    text = str(err.value)
    assert str(out) in text and "pool-x" in text  # names the dataset and where
    assert "is full" in text and "free space" in text  # says why and what to do
    assert "No space left on device" in text
    _assert_dataset_is(out, before, "old")  # the previous dataset is untouched and loads
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("point", ["data write", "data fsync", "sidecar fsync"])
def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, point):
    path = tmp_path / "models" / "checkpoint.pt"
    old = {"w": torch.arange(10_000, dtype=torch.float32), "step": 1}
    ckpt.save_checkpoint(path, old)
    old_sidecar = ckpt.sidecar_path(path).read_text()
    real_save = torch.save
    if point == "data write":  # the disk fills up part-way through torch.save's bytes

        class Full(io.RawIOBase):
            def __init__(self, fh):
                self.fh, self.written = fh, 0

            def writable(self):
                return True

            def write(self, data):
                if self.written + len(data) > 20_000:
                    raise enospc()
                self.written += len(data)
                return self.fh.write(data)

        monkeypatch.setattr(ckpt.torch, "save", lambda obj, fh: real_save(obj, Full(fh)))
    else:  # 1st fsync: the data file, 2nd: the new sidecar
        monkeypatch.setattr(os, "fsync", fail_after(os.fsync, 0 if point == "data fsync" else 1))
    new = {"w": torch.zeros(10_000), "step": 2}
    with pytest.raises(CheckpointError) as err:
        ckpt.save_checkpoint(path, new)
    monkeypatch.undo()
    assert str(path) in str(err.value) and "is full" in str(err.value)
    assert ckpt.sidecar_path(path).read_text() == old_sidecar
    assert ckpt.verify_checksum(path) is True
    loaded = ckpt.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], old["w"])
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def pool_world(tmp_path_factory) -> Path:
    return toy_pretrain_world(tmp_path_factory.mktemp("faults-pool"), MODEL)


def pretrain_cfg(world: Path, out: Path, **kw) -> PretrainConfig:
    return toy_pretrain_cfg(world, out, MODEL, **{"workers": 0, **kw})


def test_disk_full_during_pretraining_keeps_the_last_checkpoint(pool_world, tmp_path, monkeypatch):
    """The periodic checkpoint at step 6 hits a full disk: the run stops with a clear error,
    the step-3 checkpoint is intact, and the next run resumes from it and finishes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = pretrain_cfg(pool_world, tmp_path / "out")
    real_save, real_fsync = ckpt.save_checkpoint, os.fsync

    def save(path, state):  # the disk is full exactly while step 6 is being saved
        full = Path(path).name == "step-000006.pt"
        monkeypatch.setattr(os, "fsync", fail_after(real_fsync, 0) if full else real_fsync)
        try:
            real_save(path, state)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr("clipshift.stages.pretrain.save_checkpoint", save)
    with pytest.raises(CheckpointError, match="is full"):
        run_pretrain(cfg, "toy", progress=False)
    monkeypatch.undo()
    resume = tmp_path / "out" / "toy" / "resume"
    assert ckpt.latest_checkpoint(resume).name == "step-000003.pt"
    assert leftovers(tmp_path) == []
    tracker = RecordingTracker()
    metrics = run_pretrain(cfg, "toy", tracker=tracker, progress=False)
    assert tracker.tags["clipshift.resumed_from"].endswith("step-000003.pt")
    assert metrics["steps"] == 8
    assert ckpt.load_checkpoint(tmp_path / "out" / "toy" / "checkpoint.pt")["step"] == 8


# ============================================================================================
# 2. S3 answering 500/503 or cutting bodies short


class FaultProxy(http.server.ThreadingHTTPServer):
    """A forwarding proxy in front of moto_server that injects faults on request.

    ``fail`` answers the next N requests (of ``fail_method`` if set) with an S3 ``503 Slow
    Down``; ``cut`` maps a key fragment to how many of its GETs send only ``cut_at`` body bytes
    and then drop the connection (``math.inf``: every time). ``log`` records each request as
    (method, path, status, Range header).
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urlsplit(upstream)
        self.fail = 0
        self.fail_method: str | None = None
        self.cut: dict[str, float] = {}
        self.cut_at = 100_000
        self.log: list[tuple[str, str, int, str | None]] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, method: str, path: str) -> tuple[bool, bool]:
        with self.lock:
            fail = self.fail > 0 and self.fail_method in (None, method)
            if fail:
                self.fail -= 1
            frag = next((f for f in self.cut if f in path), None) if method == "GET" else None
            cut = frag is not None and self.cut[frag] > 0
            if cut:
                self.cut[frag] -= 1
            return fail, cut


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fail, cut = self.server.take_fault(self.command, self.path)
        if fail:
            self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            return
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        drop = HOP_HEADERS - ({"content-length"} if self.command == "HEAD" else set())
        passed = {k: v for k, v in resp.getheaders() if k.lower() not in drop}
        self._reply(resp.status, passed, data, cut_at=self.server.cut_at if cut else None)

    def _reply(self, status: int, headers: dict, data: bytes, cut_at: int | None = None) -> None:
        self.server.log.append((self.command, self.path, status, self.headers.get("Range")))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.command == "HEAD":  # no body: pass the object's length through
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut_at is None or len(data) <= cut_at:
            self.wfile.write(data)
            return
        self.wfile.write(data[:cut_at])  # then hang up mid-body, as a dying server does
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def moto_url():
    with run_moto_server() as url:
        yield url


PAYLOAD = random.Random(5).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def proxy(moto_url, monkeypatch) -> Iterator[FaultProxy]:
    """Bucket ``bkt`` on moto (filled directly), clipshift's S3 client pointed at the proxy."""
    import boto3

    direct = boto3.client("s3", endpoint_url=moto_url, **_boto_creds())
    direct.create_bucket(Bucket="bkt")
    direct.put_object(Bucket="bkt", Key="data/blob.bin", Body=PAYLOAD)
    server = FaultProxy(moto_url)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    use_s3_endpoint(monkeypatch, server.base_url, max_attempts=3)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        for obj in direct.list_objects_v2(Bucket="bkt").get("Contents", []):
            direct.delete_object(Bucket="bkt", Key=obj["Key"])
        direct.delete_bucket(Bucket="bkt")


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_CREDS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"],
        "region_name": DUMMY_CREDS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The downloader's backoff pauses, recorded (and shortened so the tests stay fast)."""
    recorded: list[float] = []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        time.sleep(0.01)

    monkeypatch.setattr(download_mod, "time", types.SimpleNamespace(sleep=sleep))
    return recorded


def _statuses(proxy: FaultProxy, method: str) -> list[int]:
    return [status for m, _, status, _ in proxy.log if m == method]


def test_s3_503s_are_retried_with_backoff_then_succeed(proxy, tmp_path):
    proxy.fail = 2  # the HEAD and its first retry get 503; the third attempt goes through
    path = materialise(parse_uri("s3://bkt/data/blob.bin"), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _statuses(proxy, "HEAD") == [503, 503, 200]
    assert _statuses(proxy, "GET") == [200]
    # boto3's standard retry mode: exponential backoff with jitter, bounded attempts
    assert s3_client().meta.config.retries == {"mode": "standard", "total_max_attempts": 3}


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_s3_503s_that_never_stop_give_a_clear_error(proxy, tmp_path, method):
    proxy.fail, proxy.fail_method = 10**6, method
    with pytest.raises(DataError) as err:
        materialise(parse_uri("s3://bkt/data/blob.bin"), tmp_path, progress=False)
    text = str(err.value)
    assert "bucket 'bkt'" in text and "key 'data/blob.bin'" in text
    assert "503" in text and "retry later" in text and "AWS_MAX_ATTEMPTS" in text
    assert _statuses(proxy, method) == [503, 503, 503]  # AWS_MAX_ATTEMPTS=3, then it stops
    complete = [p for p in tmp_path.rglob("*") if p.is_file() and ".part" not in p.name]
    assert complete == []  # nothing half-downloaded is published


def test_s3_body_cut_mid_stream_resumes_by_range(proxy, tmp_path, sleeps):
    proxy.cut = {"blob.bin": 2}  # two GETs die after 100 kB each, the third completes
    path = materialise(parse_uri("s3://bkt/data/blob.bin"), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    ranges = [r for m, _, _, r in proxy.log if m == "GET"]
    assert ranges == [None, "bytes=100000-", "bytes=200000-"]  # resumed, not restarted
    assert sleeps == [0.5, 1.0]  # exponential backoff between attempts


def _shard_bytes(prefix: str, n: int = 6) -> bytes:
    rng = random.Random(prefix)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            image = Image.frombytes("RGB", (24, 24), rng.randbytes(24 * 24 * 3))
            png = io.BytesIO()
            image.save(png, format="PNG")
            for ext, payload in (("png", png.getvalue()), ("txt", f"{prefix} {i}".encode())):
                info = tarfile.TarInfo(f"{prefix}{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_s3_shard_failing_mid_read_is_retried_then_skipped_and_counted(
    proxy, moto_url, tmp_path, sleeps
):
    import boto3

    direct = boto3.client("s3", endpoint_url=moto_url, **_boto_creds())
    shards = {f"pool/shard-{i}.tar": _shard_bytes(f"s{i}_") for i in range(3)}
    for key, payload in shards.items():
        direct.put_object(Bucket="bkt", Key=key, Body=payload)
    proxy.cut_at = 4000
    proxy.cut = {"shard-1.tar": math.inf}  # this shard's body always breaks off
    src = SourceConfig(name="pool-s3", uri="s3://bkt/pool/shard-{0..2}.tar", role="pool")
    info = fetch_source(src, tmp_path / "out", tmp_path / "cache", progress=False)
    assert info.extra["bad_shards"] == ["s3://bkt/pool/shard-1.tar"]
    assert info.extra["skip_reasons"] == {"shard download failed": 1}
    assert info.num_samples == 12  # shards 0 and 2 in full
    keys = sorted(s["json"]["source_key"] for s in iter_dataset(tmp_path / "out" / "pool-s3"))
    assert keys == sorted([f"s0_{i:03d}" for i in range(6)] + [f"s2_{i:03d}" for i in range(6)])
    cut_gets = [r for m, p, _, r in proxy.log if m == "GET" and "shard-1" in p]
    assert len(cut_gets) == 6 and cut_gets[1] == "bytes=4000-"  # 1 try + 5 resumed retries
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_streamed_shard_breaking_off_is_retried_then_skipped_and_counted(tmp_path, monkeypatch):
    """The training stream (webdataset) over remote shards: a shard whose read breaks off is
    re-read without repeating samples; one that always breaks off is skipped and counted."""
    import open_clip

    from clipshift.data import loaders

    monkeypatch.setattr(loaders, "SHARD_BACKOFF_S", 0.01)
    pool = build_pool(tmp_path, n=24, shard_size=8)
    paths = [str(p) for p in load_info(pool).shard_paths(pool)]
    cut = len(Path(paths[0]).read_bytes()) // 2
    flaky = tmp_path / "flaky.sh"  # the first read of a shard dies half-way, later ones work
    flaky.write_text(
        'if [ -e "$2" ]; then cat "$1"; else touch "$2"; head -c "$3" "$1"; exit 1; fi\n'
    )
    urls = [
        f"pipe:sh {flaky} {paths[0]} {tmp_path / 'seen0'} {cut}",
        f"pipe:sh -c 'head -c {cut} {paths[1]}; exit 1'",  # always breaks off
        f"pipe:cat {paths[2]}",
    ]
    counter = loaders.SkipCounter()
    tok = open_clip.get_tokenizer("clipshift-vit-micro")
    stream = loaders.pool_dataset(
        urls, tok, 32, epochs=1, shuffle_buffer=1, handler=counter, with_keys=True
    )
    keys = [key for _, _, key in stream]
    assert len(keys) == len(set(keys))  # the re-read shard repeats nothing
    by_shard = [sorted(k for k in keys if int(k[1:]) // 8 == i) for i in range(3)]
    assert by_shard[0] == [f"s{i:05d}" for i in range(8)]  # re-read in full after the break
    assert by_shard[2] == [f"s{i:05d}" for i in range(16, 24)]
    assert (
        by_shard[1] == [f"s{i:05d}" for i in range(8, 8 + len(by_shard[1]))]
        and len(by_shard[1]) < 8
    )  # what arrived before it broke off, then the rest skipped
    assert counter.count == 1  # counted once, after its retries


# ============================================================================================
# MLflow server on loopback


def start_mlflow(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / f"mlflow-{port}.log", "ab")  # noqa: SIM115 - kept open by the child
    return subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: uvicorn's workers die with it
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout_s} s")


def kill_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A server on a free port; yields (url, [process]): a test may replace the process."""
    port = free_port()
    procs = [start_mlflow(root, port)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs[0])
        yield url, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_server(proc)


def _client(url: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=url)


def _runs(url: str) -> list:
    client = _client(url)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client.search_runs([exp.experiment_id])


# ============================================================================================
# 3. two pipeline runs at once

FETCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from clipshift import tracking
    from clipshift.config import FetchConfig
    from clipshift.stages.fetch import run_fetch

    cfg = FetchConfig.model_validate_json(sys.argv[1])
    start = time.time()
    with tracking.stage_run("fetch", params=cfg.model_dump(mode="json")) as tracker:
        manifest = run_fetch(cfg, tracker, progress=False)
    print(json.dumps({"run_id": tracker.run_id, "start": start, "end": time.time(),
                      "datasets": sorted(manifest["datasets"])}))
    """
)


def _assert_complete_dataset(path: Path) -> int:
    info = load_info(path)
    for shard in info.shards:
        assert sha256_file(path / shard.file) == shard.sha256, f"{shard.file} clobbered"
    samples = list(iter_dataset(path))
    assert len(samples) == info.num_samples > 0
    return info.num_samples


@pytest.mark.slow
def test_two_fetch_runs_at_once_share_outputs_and_mlflow_cleanly(tmp_path):
    from clipshift.config import FetchConfig

    out = tmp_path / "data" / "fetch"
    cfg = FetchConfig(world=TINY_WORLD, out_dir=str(out), cache_dir=str(ART_CACHE))
    with mlflow_server(tmp_path) as (url, _):
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": url,
            "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        }
        env.pop("CLIPSHIFT_PIPELINE_RUN_ID", None)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", FETCH_SCRIPT, cfg.model_dump_json()],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr.decode()[-3000:]
            results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        runs = _runs(url)
    a, b = results
    assert a["start"] < b["end"] and b["start"] < a["end"], "the runs did not overlap"
    # files: every dataset complete and matching its hashes, the manifest whole, no debris
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["datasets"]) == a["datasets"] == b["datasets"]
    for name, entry in manifest["datasets"].items():
        assert _assert_complete_dataset(out / name) == entry["num_samples"]
    assert leftovers(tmp_path / "data") == []
    # MLflow: two distinct finished stage runs under one pipeline run, nothing duplicated
    stages = [r for r in runs if r.data.tags.get("clipshift.stage") == "fetch"]
    parents = [r for r in runs if r.data.tags.get("clipshift.kind") == "pipeline"]
    assert sorted(r.info.run_id for r in stages) == sorted([a["run_id"], b["run_id"]])
    assert len(parents) == 1
    for run in stages:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["world.num_classes"] == str(TINY_WORLD["num_classes"])
        assert run.data.metrics["world_pool-diverse_samples"] == TINY_WORLD["pool_size"]


# ============================================================================================
# 4. the MLflow server restarting under training


def _train_with_outage(
    world: Path, out: Path, server: tuple[str, list[subprocess.Popen]], root: Path, restart: bool
) -> tuple[dict, str, list[float]]:
    """Pretrain with tracking to the server; kill it after step 3 and (if ``restart``) bring it
    back on the same port and store (``root``) after step 9. Returns (metrics, run id, the wall
    time of each step logged while the server was down)."""
    url, procs = server
    cfg = pretrain_cfg(world, out, samples=32 * 14)
    port = int(url.rsplit(":", 1)[1])
    outage: list[float] = []
    last = [time.perf_counter()]

    def after_step(step: int, model) -> None:
        now = time.perf_counter()
        if 3 < step <= 9:
            outage.append(now - last[0])
        if step == 3:
            kill_server(procs[0])
        if step == 9 and restart:
            procs.append(start_mlflow(root, port))
            wait_healthy(url, procs[-1])
        last[0] = time.perf_counter()

    with tracking.stage_run("pretrain", params={"pool": "toy"}) as tracker:
        metrics = run_pretrain(cfg, "toy", tracker, False, TrainHooks(after_step=after_step))
    return metrics, tracker.run_id, outage


@pytest.fixture
def outage_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CLIPSHIFT_PIPELINE_RUN_ID", raising=False)
    # The MLflow client's own retries, shortened from minutes so the test takes seconds.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.slow
def test_mlflow_restart_during_training_loses_nothing(
    pool_world, tmp_path, outage_env, monkeypatch
):
    srv = tmp_path / "srv"
    srv.mkdir()
    with mlflow_server(srv) as server:
        url, procs = server
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        metrics, run_id, outage = _train_with_outage(
            pool_world, tmp_path / "out", server, srv, restart=True
        )
        assert len(procs) == 2 and procs[1].poll() is None  # it really came back
        client = _client(url)
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "loss")
    assert metrics["steps"] == 14
    state = ckpt.load_checkpoint(tmp_path / "out" / "toy" / "checkpoint.pt")
    assert state["step"] == 14 and ckpt.verify_checksum(tmp_path / "out" / "toy" / "checkpoint.pt")
    assert run.info.status == "FINISHED"
    # every step's loss reached the server, those logged during the outage included
    assert sorted(m.step for m in history) == list(range(1, 15))
    assert not list(Path("metrics").glob("unsent-*.json"))
    # training went on during the outage: no step waited out the client's retries
    # (the client's retries take ~2 s here, minutes by default): a step waits at most
    # METRIC_WAIT_S when it starts a send, and most steps do not wait at all
    assert max(outage) < tracking.METRIC_WAIT_S + 2.0, outage
    assert sorted(outage)[len(outage) // 2] < 1.0, outage


@pytest.mark.slow
def test_mlflow_gone_for_good_saves_metrics_locally(pool_world, tmp_path, outage_env, monkeypatch):
    monkeypatch.setenv(tracking.FLUSH_TIMEOUT_ENV, "1")
    srv = tmp_path / "srv"
    srv.mkdir()
    with mlflow_server(srv) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server[0])
        with pytest.raises(ClipshiftError) as err:
            _train_with_outage(pool_world, tmp_path / "out", server, srv, restart=False)
    text = str(err.value)
    assert "outputs are written" in text and "MLFLOW_TRACKING_URI" in text
    unsent = list(Path("metrics").glob("unsent-*.json"))
    assert len(unsent) == 1 and str(unsent[0]) in text
    saved = json.loads(unsent[0].read_text())
    assert {m["step"] for m in saved if m["key"] == "loss"} >= set(range(5, 15))
    path = tmp_path / "out" / "toy" / "checkpoint.pt"
    assert ckpt.load_checkpoint(path)["step"] == 14 and ckpt.verify_checksum(path)


# ============================================================================================
# 5. malformed webdataset samples through fetch (the external-data path) and the stream


def _png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 10, 200)).save(buf, format="JPEG")
    return buf.getvalue()


KNOWN_REASONS = {
    "missing image",
    "undecodable image",
    "image bytes do not match their extension",
    "unsupported image type",
    f"caption longer than {MAX_CAPTION_CHARS} chars",
    "caption is not utf-8",
    "bad json metadata",
}
payloads = st.one_of(
    st.binary(max_size=48),
    st.just(_png()),
    st.just(_jpeg()),
    st.just(_png()[:-20]),  # truncated image
    st.just(b"x" * (MAX_CAPTION_CHARS + 1)),  # huge caption
    st.text(max_size=40).map(str.encode),
)
sample_members = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["png", "jpg", "webp", "gif", "txt", "json", "exe", "PNG"]),
        payloads,
    ),
    max_size=10,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=sample_members)
def test_fetch_of_malformed_samples_skips_and_counts_or_fails_clearly(tmp_path_factory, parts):
    root = tmp_path_factory.mktemp("fuzz")
    shard = root / "in" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, ext, payload in parts:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    src = SourceConfig(name="pool-fuzz", uri=str(shard.parent), role="pool", format="webdataset")
    try:
        info = fetch_source(src, root / "out", root / "cache", progress=False)
    except (DataError, ConfigError) as exc:
        assert "gave no usable samples" in str(exc) and "pool-fuzz" in str(exc)
        assert leftovers(root) == []
        return
    reasons = info.extra["skip_reasons"]
    assert set(reasons) <= KNOWN_REASONS, reasons
    written = list(iter_dataset(root / "out" / src.name))
    assert info.extra["read"] == info.num_samples == len(written)
    assert info.extra["skipped"] == sum(reasons.values())


def test_stream_loader_skips_and_counts_malformed_samples(tmp_path):
    """The webdataset training stream: every malformed kind is skipped and counted."""
    import open_clip

    from clipshift.data import loaders

    bad = {
        "k_noimage": [("txt", b"a caption without an image")],
        "k_undecodable": [("png", b"\x89PNG not an image"), ("txt", b"broken")],
        "k_wrongext": [("gif", _png()), ("txt", b"a gif name")],
        "k_nocaption": [("png", _png())],
    }
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        rows = [(f"ok{i}", [("png", _png()), ("txt", b"x" * 50_000)]) for i in range(3)]
        for key, members in [*rows, *bad.items()]:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    counter = loaders.SkipCounter()
    tok = open_clip.get_tokenizer("clipshift-vit-micro")
    stream = loaders.pool_dataset(
        [str(shard)], tok, 16, epochs=1, shuffle_buffer=1, handler=counter, with_keys=True
    )
    keys = sorted(key for _, _, key in stream)
    assert keys == ["ok0", "ok1", "ok2"]  # a huge caption is truncated by the tokenizer
    assert counter.count == len(bad)
