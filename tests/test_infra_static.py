"""Static checks of what cannot run here (no Docker daemon, no cluster): the compose file, the
worker image, the Kubernetes work-pool template and torchrun manifest, prefect.yaml, and the
local platform scripts. The Kubernetes template is also accepted by a real (temporary)
Prefect server and rendered by prefect-kubernetes into a Job checked against the Kubernetes
API models, field by field."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from clipshift import deploy
from clipshift.config import PretrainConfig, load_params

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
TORCHRUN = INFRA / "k8s" / "torchrun-job.yaml"


def endpoint_names() -> set[str]:
    """Variable names up.sh writes to endpoints.env (the heredoc between `cat >"$tmp"` and EOF)."""
    text = (INFRA / "local" / "up.sh").read_text()
    block = text.split('cat >"$tmp" <<EOF', 1)[1].split("\nEOF", 1)[0]
    return set(re.findall(r"^export (\w+)=", block, flags=re.M))


def up_default_ports() -> dict[str, str]:
    text = (INFRA / "local" / "up.sh").read_text()
    return dict(re.findall(r"\$\{(CLIPSHIFT_\w+_PORT):-(\d+)\}", text))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


# --------------------------------------------------------------------------------------------
# local platform scripts


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_scripts_parse(script):
    path = INFRA / "local" / script
    assert os.access(path, os.X_OK), f"{path} must be executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(path)], check=True)


def test_up_binds_loopback_only_and_writes_endpoints():
    text = (INFRA / "local" / "up.sh").read_text()
    assert re.search(r"^HOST=127\.0\.0\.1\b", text, flags=re.M)
    # up.sh starts the Prefect server through prefect-server.sh (which sets its UI's API URL)
    server = (INFRA / "local" / "prefect-server.sh").read_text()
    assert re.search(r"^HOST=127\.0\.0\.1\b", server, flags=re.M)
    binds = re.findall(r"(?:--host|--address|-H) (\S+)", text + server)
    assert len(binds) == 4 and set(binds) == {'"$HOST"'}, binds  # moto, s3rver, mlflow, prefect
    assert {
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "CLIPSHIFT_BUCKET",
        "CLIPSHIFT_DVC_REMOTE",
    } <= endpoint_names()
    # the MLflow server runs lean: one worker and no job runner
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in text and "--workers 1" in text


# --------------------------------------------------------------------------------------------
# compose


def test_compose_services_and_dependencies(compose):
    services = compose["services"]
    assert {"s3", "postgres", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name} has neither image nor build"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose.get("volumes", {}), f"volume {source} not declared"
        for cfg in svc.get("configs", []):
            assert cfg["source"] in compose.get("configs", {})


def test_compose_ports_are_loopback_and_match_local_platform(compose):
    defaults = up_default_ports()
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            match = re.match(r"127\.0\.0\.1:\$\{(\w+):-(\d+)\}:\d+", port)
            assert match, port
            published[match.group(1)] = match.group(2)
    for var in ("CLIPSHIFT_S3_PORT", "CLIPSHIFT_MLFLOW_PORT", "CLIPSHIFT_PREFECT_PORT"):
        assert published[var] == defaults[var], f"{var}: compose and up.sh disagree"


def test_compose_worker_env_matches_endpoints_and_has_gpu(compose):
    worker = compose["services"]["worker"]
    env = worker["environment"]
    missing = endpoint_names() - set(env)
    assert not missing, f"worker lacks endpoint variables {missing}"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3:9000"
    assert env["CLIPSHIFT_WORKDIR"] == "/opt/clipshift"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert any("--pool=${CLIPSHIFT_WORK_POOL:-clipshift-local}" in a for a in worker["command"])


def test_compose_mlflow_uses_postgres_and_s3(compose):
    mlflow = compose["services"]["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql://" in args
    assert "--artifacts-destination=s3://${CLIPSHIFT_BUCKET:-clipshift}/mlartifacts" in args
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    prefect = compose["services"]["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # the same credentials reach MinIO, the bucket job, MLflow and the worker
    s3 = compose["services"]["s3"]["environment"]
    assert s3["MINIO_ROOT_USER"] == mlflow["environment"]["AWS_ACCESS_KEY_ID"]


def test_dockerfile_targets_and_copies(compose):
    text = (INFRA / "docker" / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M))
    for svc in compose["services"].values():
        build = svc.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).resolve().exists()
            assert build["target"] in stages
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert "ENV" in text and "CLIPSHIFT_WORKDIR=/opt/clipshift" in text


# --------------------------------------------------------------------------------------------
# prefect.yaml and the deploy helper


@pytest.fixture(scope="module")
def prefect_spec() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _flow_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any("flow" in ast.unparse(d) for d in node.decorator_list)
    }


def test_prefect_yaml_entrypoints_are_flows(prefect_spec):
    stages = set()
    for dep in prefect_spec["deployments"]:
        file, func = dep["entrypoint"].split(":")
        stages.add(Path(file).stem)
        assert func == f"{Path(file).stem}_flow"
        if (REPO / file).exists():  # flows still being written are skipped by deploy_all
            assert func in _flow_functions(REPO / file), f"{func} is not a flow in {file}"
        assert dep["work_pool"]["name"] == "clipshift-local"
    expected = {"fetch", "validate", "pretrain", "finetune", "interpolate", "evaluate"}
    assert expected | {"pipeline"} <= stages
    pull = prefect_spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $CLIPSHIFT_WORKDIR }}"  # resolved by the worker, at run time


def test_effective_spec_names_pools_and_fills_params(prefect_spec):
    params = load_params(REPO / "params.yaml")
    local, skipped = deploy.effective_spec(prefect_spec, "clipshift-local", REPO, params)
    assert {d["name"] for d in local["deployments"]} == {"local"}
    by_stage = {Path(d["entrypoint"].split(":")[0]).stem: d for d in local["deployments"]}
    assert by_stage["fetch"]["parameters"]["config"] == params.fetch.model_dump(mode="json")
    assert by_stage["pretrain"]["parameters"]["pool"] == params.pretrain.pools[0]
    if "scaling" in by_stage:
        scaling = by_stage["scaling"]["parameters"]
        assert scaling["pretrain"] == params.pretrain.model_dump(mode="json")
    assert "type" not in by_stage["fetch"]["work_pool"]
    if "pipeline" in by_stage:
        assert set(by_stage["pipeline"]["parameters"]["params"]) >= {"fetch", "validate"}
    k8s, _ = deploy.effective_spec(prefect_spec, "clipshift-k8s", REPO, None, only=["pretrain"])
    (dep,) = k8s["deployments"]
    assert dep["name"] == "k8s" and dep["work_pool"]["name"] == "clipshift-k8s"
    assert dep["work_pool"]["job_variables"]["gpu_count"] >= 1
    assert "parameters" not in dep
    assert deploy._pool_type(prefect_spec, "clipshift-k8s") == "kubernetes"


def test_effective_spec_skips_missing_entrypoints(tmp_path, prefect_spec):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "fetch.py").write_text("")
    spec, skipped = deploy.effective_spec(prefect_spec, "clipshift-local", tmp_path)
    assert [d["entrypoint"] for d in spec["deployments"]] == ["flows/fetch.py:fetch_flow"]
    assert "flows/pipeline.py:pipeline_flow" in skipped


def test_deploy_cli_reports_missing_server(tmp_path):
    # No server at that address: one clear error, exit status 2, no traceback.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run(
        [sys.executable, "-m", "clipshift.deploy", "ensure-pool", "--pool", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no Prefect server answers at http://127.0.0.1:9/api" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Kubernetes


def k8s_errors(obj, type_name: str, path: str = "") -> list[str]:
    """Fields of a manifest that the Kubernetes API model does not know, or of the wrong shape."""
    from kubernetes_asyncio.client import models

    if type_name.startswith("list["):
        if not isinstance(obj, list):
            return [f"{path}: expected a list"]
        inner = type_name[5:-1]
        return [e for i, x in enumerate(obj) for e in k8s_errors(x, inner, f"{path}[{i}]")]
    if type_name.startswith("dict(") or not hasattr(models, type_name):
        return []  # scalars, maps, int-or-string
    cls = getattr(models, type_name)
    if not isinstance(obj, dict):
        return [f"{path}: expected an object ({type_name})"]
    by_json = {v: k for k, v in cls.attribute_map.items()}
    errors = []
    for key, value in obj.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors += k8s_errors(value, cls.openapi_types[by_json[key]], f"{path}.{key}")
    return errors


def test_template_placeholders_are_declared():
    template = json.loads(TEMPLATE.read_text())
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert resources["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1


def test_template_accepted_by_prefect_and_renders_a_gpu_job(prefect_harness, tmp_path):
    pytest.importorskip("prefect_kubernetes", reason="pip install -e '.[k8s]'")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    name = f"k8s-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", name, "--type", "kubernetes"]
        + ["--base-job-template", str(TEMPLATE)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    template = json.loads(TEMPLATE.read_text())

    async def render() -> dict:
        async with get_client() as client:
            pool = await client.read_work_pool(name)
        assert pool.type == "kubernetes"
        assert pool.base_job_template == template
        cfg = await KubernetesWorkerJobConfiguration.from_template_and_values(
            pool.base_job_template, {"gpu_count": 4, "env": {"EXTRA": "1"}}
        )
        cfg.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="static-check"))
        return cfg.job_manifest

    job = asyncio.run(render())
    assert k8s_errors(job, "V1Job") == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env_names = {e["name"] for e in container["env"]}
    assert {"EXTRA", "PREFECT__FLOW_RUN_ID"} <= env_names
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.fixture(scope="module")
def torchrun_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(TORCHRUN.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_torchrun_manifests_are_valid_k8s(torchrun_docs):
    pytest.importorskip("kubernetes_asyncio", reason="pip install -e '.[k8s]'")
    assert set(torchrun_docs) == {"ConfigMap", "Service", "Job"}
    for kind, doc in torchrun_docs.items():
        assert doc["apiVersion"] and doc["metadata"]["name"]
        assert k8s_errors(doc, f"V1{kind}") == [], kind


def test_torchrun_job_is_consistent(torchrun_docs):
    job, svc, cfg = (torchrun_docs[k] for k in ("Job", "Service", "ConfigMap"))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    pretrain = PretrainConfig.model_validate_json(cfg["data"]["pretrain.json"])
    dist = pretrain.distributed

    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == dist.nnodes > 1
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert gpus == dist.nproc_per_node
    # headless service that gives pod 0 a stable name before it is ready
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"]
    host, port = dist.rdzv_endpoint.split(":")
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    # every pod runs clipshift's launcher, which reads the rank counts from pretrain.json
    command = " ".join(container["args"])
    assert command.startswith("exec python -m clipshift.distributed launch pretrain")
    assert "--config-json /etc/clipshift/pretrain.json" in command
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/clipshift"
    env = {e["name"] for e in container["env"]}
    assert not env & {"NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT"}  # one place for each number
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cfg["metadata"]["name"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    namespaces = {d["metadata"]["namespace"] for d in (job, svc, cfg)}
    assert len(namespaces) == 1


def test_launcher_builds_the_multi_node_torchrun_of_the_job(torchrun_docs):
    """What each pod's launcher runs: torchrun with the Job's numbers and rendezvous."""
    from clipshift.distributed import torchrun_command

    cfg = torchrun_docs["ConfigMap"]
    dist = PretrainConfig.model_validate_json(cfg["data"]["pretrain.json"]).distributed
    cmd = torchrun_command(dist, "clipshift-pretrain-diverse", ["--entry", "x"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for piece in (
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=clipshift-pretrain-0.clipshift-pretrain:29400",
        "--rdzv-id=clipshift-pretrain-diverse",
    ):
        assert piece in cmd
    assert "--standalone" not in cmd
    assert cmd[-5:] == ["-m", "clipshift.distributed", "rank", "--entry", "x"]
    one_node = torchrun_command(dist.model_copy(update={"nnodes": 1}), "id", [])
    assert "--standalone" in one_node and not any("rdzv" in c for c in one_node)
