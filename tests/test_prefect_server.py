"""The temporary Prefect server a stage command starts early (clipshift.prefect_server).

Each check runs in a fresh interpreter: the early start only applies before Prefect is imported,
and the test process has imported it already.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.tiny import ART_CACHE, TINY_WORLD, full_params

DECIDE = (
    "from clipshift import prefect_server as p; "
    "print(json.dumps(p._configured_elsewhere(p._prefect_dir())))"
)
LIFECYCLE = """
import json, urllib.request
from clipshift import prefect_server as p
server = p.start_early()
server.wait_until_ready()
from prefect.settings import get_current_settings
with urllib.request.urlopen(server.api_url + "/health") as r:
    health = json.load(r)
server.stop()
print(json.dumps({"url": server.api_url, "health": health, "settings_url":
    get_current_settings().api.url, "exit": server.process.returncode}))
"""


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        **extra,
    )
    return env


def python(code: str, tmp_path: Path, env: dict[str, str], timeout: float = 150) -> object:
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def refuses(url: str) -> bool:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def test_nothing_started_when_prefect_is_configured_otherwise(tmp_path):
    assert python(DECIDE, tmp_path, clean_env(tmp_path)) is False  # the plain default
    configured = [
        clean_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"),
        clean_env(tmp_path, PREFECT_SERVER_EPHEMERAL_ENABLED="false"),
        clean_env(tmp_path, PREFECT_PROFILE="local"),  # Prefect's default profile with a URL
    ]
    for env in configured:
        assert python(DECIDE, tmp_path, env) is True, {k: env[k] for k in env if "PREFECT" in k}
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    assert python(DECIDE, tmp_path, clean_env(tmp_path)) is True
    (home / "profiles.toml").write_text(
        'active = "ephemeral"\n[profiles.other]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    assert python(DECIDE, tmp_path, clean_env(tmp_path)) is False  # only the active one counts
    (tmp_path / "pyproject.toml").write_text('[tool.prefect.api]\nurl = "http://x:9/api"\n')
    assert python(DECIDE, tmp_path, clean_env(tmp_path)) is True


def test_early_server_answers_is_what_prefect_uses_and_stops(tmp_path):
    out = python(LIFECYCLE, tmp_path, clean_env(tmp_path))
    assert out["health"] is True
    assert out["settings_url"] == out["url"]  # Prefect imported afterwards talks to it
    assert out["exit"] is not None and refuses(out["url"])


def prefect_rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.slow
def test_stage_command_runs_its_flow_on_the_early_server(tmp_path):
    params = full_params({"fetch": {"world": dict(TINY_WORLD), "cache_dir": str(ART_CACHE)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        ["clipshift", "fetch"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    url = log.split("temporary Prefect server on ", 1)[1].split()[0]
    assert "Starting temporary server" not in log  # Prefect did not start a second one
    assert refuses(url)  # stopped with the process

    db = tmp_path / "prefect-home" / "prefect.db"
    ((flow_run_id, state),) = prefect_rows(
        db,
        "SELECT flow_run.id, flow_run.state_type FROM flow_run "
        "JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name = 'fetch'",
    )
    assert state == "COMPLETED"
    tasks = prefect_rows(db, "SELECT name, state_type FROM task_run")
    assert [s for n, s in tasks if n.startswith("fetch-datasets")] == ["COMPLETED"]
    links = prefect_rows(db, "SELECT data FROM artifact WHERE key = 'mlflow-fetch'")
    assert len(links) == 1

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("clipshift")
    (run,) = client.search_runs([exp.experiment_id], "tags.`clipshift.stage` = 'fetch'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"].replace("-", "") == flow_run_id.replace("-", "")
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["clipshift.kind"] == "pipeline"
    assert run.info.run_id in links[0][0]  # the link artifact points at this MLflow run


def test_server_dies_with_a_killed_stage_process(tmp_path):
    code = (
        "import os, signal\nfrom clipshift import prefect_server as p\n"
        "server = p.start_early()\nserver.wait_until_ready()\n"
        "print(server.api_url, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == -9
    url = done.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 10
    while not refuses(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refuses(url), "the temporary server outlived the killed stage process"
