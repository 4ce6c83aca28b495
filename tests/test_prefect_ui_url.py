"""The Prefect UI reaches its own API wherever a clipshift launcher serves it.

The UI reads its API address from the server's ``/ui-settings`` (``api_url``); Prefect fills it
from PREFECT_UI_API_URL, else port 4200. A server on 14200 without it serves a UI that shows
"Can't connect to Server API" and empty pages while the API answers (issue 13). Here the
platform's launcher (infra/local/prefect-server.sh, which up.sh runs) is started on a free
port and its ``/ui-settings`` is read; the other launchers are checked statically.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BIN, REPO

LAUNCHER = REPO / "infra" / "local" / "prefect-server.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).json() is True:
                return
        except (httpx.HTTPError, ValueError):
            time.sleep(0.3)
    pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def launched_server(tmp_path):
    """The platform's Prefect server on a free port, in a private PREFECT_HOME."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_UI"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), CLIPSHIFT_VENV_BIN=str(BIN))
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(LAUNCHER), str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server's uvicorn children are stopped with it
        )
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/api/health", log, timeout_s=120)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(180)
def test_ui_settings_point_at_the_servers_own_port(launched_server):
    port = launched_server
    settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    # what the browser then calls answers, e.g. the deployments the UI lists
    assert httpx.get(f"{settings['api_url']}/health", timeout=10).json() is True
    listed = httpx.post(f"{settings['api_url']}/deployments/filter", json={}, timeout=10)
    assert listed.status_code == 200 and listed.json() == []


def test_up_sh_starts_prefect_through_the_launcher():
    up = (REPO / "infra" / "local" / "up.sh").read_text()
    starts = [line for line in up.splitlines() if line.startswith("start prefect")]
    assert len(starts) == 1 and "prefect-server.sh" in starts[0]
    assert "server start" not in up  # no second way of starting it that could miss the URL
    launcher = LAUNCHER.read_text()
    assert "export PREFECT_UI_API_URL=" in launcher and "exec " in launcher


def test_compose_ui_api_url_is_the_published_port():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    server = compose["services"]["prefect-server"]
    published = server["ports"][0].rsplit(":", 1)[0]  # "127.0.0.1:${CLIPSHIFT_PREFECT_PORT...}"
    assert server["environment"]["PREFECT_UI_API_URL"] == f"http://{published}/api"
    # the worker talks to the server inside the compose network, not through the UI's URL
    worker = compose["services"]["worker"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_no_other_launcher_serves_the_ui():
    """The per-stage temporary server runs without the UI; the Kubernetes manifests and
    `clipshift deploy` start no Prefect server (they talk to one)."""
    from clipshift.prefect_server import SERVER_ENV

    assert SERVER_ENV["PREFECT_UI_ENABLED"] == "0"
    for path in (REPO / "infra" / "k8s").iterdir():
        assert "server start" not in path.read_text(), path
    assert "server start" not in (REPO / "src" / "clipshift" / "deploy.py").read_text()
