"""Real servers on loopback for data-source tests: an S3 endpoint (moto_server) and an HTTP
file server with Range support that can drop a connection part-way, to exercise resumes.

Tests import these helpers and wrap them in their own fixtures (tests/conftest.py belongs to
the project lead). Nothing here mocks boto3 or urllib: requests go over real sockets.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DUMMY_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_binary() -> str:
    candidate = Path(sys.executable).with_name("moto_server")
    return str(candidate) if candidate.exists() else "moto_server"


@contextlib.contextmanager
def run_moto_server(timeout_s: float = 20.0, enforce_auth: bool = False) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port; yield its endpoint URL; stop it after.

    ``enforce_auth`` makes moto check credentials against its (empty) IAM from the first
    request on, so any key pair is refused as a real store would refuse a wrong one.
    """
    port = free_port()
    env = dict(os.environ)
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    proc = subprocess.Popen(
        [_moto_binary(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server at {url} not ready after {timeout_s} s")


def use_s3_endpoint(monkeypatch, url: str, max_attempts: int = 2) -> None:
    """Point boto3 at ``url`` with dummy credentials, isolated from the user's AWS config."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    for name, value in DUMMY_CREDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))  # keep failing tests fast
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


# --------------------------------------------------------------------------------------------
# HTTP


class RangeFileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with HEAD and single-range GET support.

    ``drop_after`` (bytes) makes the next GET send only that many body bytes, then close the
    connection, once. ``honour_range=False`` imitates servers that ignore Range. Every GET's
    Range header (or None) is appended to ``ranges``.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.files: dict[str, bytes] = {}
        self.drop_after: int | None = None
        self.honour_range = True
        self.ranges: list[str | None] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    server: RangeFileServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        body = self._body()
        if body is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        body = self._body()
        if body is None:
            return
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        if header and self.server.honour_range:
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        drop, self.server.drop_after = self.server.drop_after, None
        self.wfile.write(payload if drop is None else payload[:drop])
        if drop is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _body(self) -> bytes | None:
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
        return body


@contextlib.contextmanager
def run_http_server() -> Iterator[RangeFileServer]:
    server = RangeFileServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
