"""Secrets set in the environment never reach MLflow, Prefect or the logs of a real run.

`clipshift pretrain` (the DVC stage command) runs for real in a subprocess, with two secrets
in its environment, launched under torchrun (2 ranks: the launcher hands the environment on
to the ranks), tracking to a SQLite MLflow store with a local artifact store and reporting to
a Prefect server. Then every file under the run's directory (the MLflow database and
artifacts, checkpoints, metrics, params), the Prefect database (flow runs, parameters,
artifacts, logs), the logs read back through the Prefect API, and the stdout and stderr of the
command and its ranks are searched for the secret values.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from clipshift.models import tiny_vit_config
from tests.test_loaders import build_pool
from tests.tiny import full_params

pytestmark = pytest.mark.slow
MODEL = "clipshift-test-secret-w32"


def sqlite_text(path: Path) -> str:
    """Every row of a SQLite database as SQL text (what a leak inside a row would look like)."""
    with sqlite3.connect(path) as db:
        return "\n".join(db.iterdump())


def every_file(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def prefect_database() -> Path:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    return Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[1])


def prefect_api_text() -> str:
    """Logs, flow-run parameters and artifacts of the pretrain flow runs, via the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pretrain"])))
        logs = client.read_logs(LogFilter(), limit=200)
        artifacts = client.read_artifacts()
    assert runs, "the pretrain flow run is not on the Prefect server"
    return json.dumps(
        {
            "parameters": [r.parameters for r in runs],
            "logs": [log.message for log in logs],
            "artifacts": [a.data for a in artifacts],
        },
        default=str,
    )


def write_params(root: Path) -> None:
    build_pool(root / "data" / "fetch", n=32, name="pool-toy")  # where fetch would put it
    (root / f"{MODEL}.json").write_text(json.dumps(tiny_vit_config(32, 1, patch_size=8)))
    pretrain = {
        "pools": ["toy"],
        "model": f"{MODEL}.json",
        "batch_size": 16,
        "samples": 32,
        "warmup_steps": 1,
        "log_every": 1,
        "workers": 0,
        "distributed": {"nproc_per_node": 2},
    }
    # the pool is put in place above: fetch (not run here) builds none
    fetch = {"use_world": False, "sources": []}
    params = full_params(
        {
            "fetch": fetch,
            "pretrain": pretrain,
            "supervised": {"pools": ["toy"]},
            "finetune": {"pool": "toy"},
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_environment_secrets_leak_nowhere(tmp_path, mlflow_store, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    found = {
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "CLIPSHIFT_API_TOKEN": "tok-" + secrets.token_hex(16),
    }
    write_params(tmp_path)
    env = {**os.environ, **found, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(
        ["clipshift", "pretrain", "--pool", "toy"],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "models/pretrain/toy/metrics.json").read_text())
    assert metrics["world_size"] == 2  # the ranks really ran, with the secrets in their env

    haystacks = {"stdout": done.stdout, "stderr": done.stderr}
    haystacks.update(every_file(tmp_path))  # mlflow.db, artifacts, checkpoints, metrics
    haystacks["mlflow rows"] = sqlite_text(tmp_path / "mlflow.db").encode()
    haystacks["prefect rows"] = sqlite_text(prefect_database()).encode()
    haystacks["prefect api"] = prefect_api_text().encode()

    # the search sees what the run wrote (else an absent secret would prove nothing)
    assert b"pretrain-toy" in haystacks["mlflow rows"]
    assert b"toy" in haystacks["prefect rows"] and b"final_loss" in haystacks["prefect api"]
    assert any(p.endswith("checkpoint.pt") and "mlartifacts" in p for p in haystacks)
    for where, blob in haystacks.items():
        for name, value in found.items():
            assert value.encode() not in blob, f"{name} leaked into {where}"
