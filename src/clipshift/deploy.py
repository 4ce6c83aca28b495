"""Register clipshift's Prefect deployments (prefect.yaml) on a Prefect server.

``deploy_all`` is ``prefect deploy --all`` with three things added: the work pool is created
when missing (process pool locally, the GPU job template of ``infra/k8s`` for Kubernetes), the
deployments are pointed at the pool asked for (prefect.yaml lists each pool under
``definitions.work_pools``; a deployment is named after its pool's key, e.g. ``fetch/local``),
and each deployment's default parameters are the sections of params.yaml, so a run started
from the UI uses the same values as ``dvc repro`` unless the form is edited.

Deployments whose entrypoint file does not exist yet are skipped with a warning.
``python -m clipshift.deploy --help`` is the command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipshift.config import SECTIONS, load_params
from clipshift.errors import ConfigError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_POOL = "clipshift-local"
K8S_TEMPLATE = Path("infra/k8s/base-job-template.json")
# Flow parameter that receives the params.yaml section (stage flows take `config`).
PIPELINE_ENTRY = "pipeline"


@dataclass
class DeployResult:
    work_pool: str
    pool_created: bool
    deployed: list[str] = field(default_factory=list)  # "<flow>/<deployment>"
    skipped: list[str] = field(default_factory=list)  # entrypoints whose file is missing
    output: str = ""


# --------------------------------------------------------------------------------------------
# work pools


def default_base_job_template(pool_type: str, project_dir: Path = REPO) -> dict[str, Any]:
    """Kubernetes pools get the GPU template shipped in infra/k8s; others Prefect's default."""
    if pool_type == "kubernetes":
        path = project_dir / K8S_TEMPLATE
        if not path.exists():
            raise ConfigError(f"{path} is missing; restore it from the repository")
        return json.loads(path.read_text())
    from prefect.workers.process import ProcessWorker

    if pool_type != "process":
        raise ConfigError(
            f"work pool type '{pool_type}' is not set up by clipshift; create the pool with "
            "`prefect work-pool create` first, or use type process or kubernetes"
        )
    return ProcessWorker.get_default_base_job_template()


def _sync_client(api_url: str | None) -> Any:
    """A client of ``api_url``, else of $PREFECT_API_URL as it is now (Prefect's own settings
    are read once at import, so a URL exported later would be missed), else of the profile."""
    from prefect.client.orchestration import SyncPrefectClient, get_client

    url = api_url or os.environ.get("PREFECT_API_URL")
    return SyncPrefectClient(url) if url else get_client(sync_client=True)


def ensure_work_pool(
    name: str = DEFAULT_POOL,
    pool_type: str = "process",
    base_job_template: dict[str, Any] | None = None,
    project_dir: Path = REPO,
    api_url: str | None = None,
) -> bool:
    """Create work pool ``name`` unless it exists; return True if it was created."""
    import httpx
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _sync_client(api_url) as client:
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            existing = None
        except httpx.TransportError as exc:
            raise ConfigError(
                f"no Prefect server answers at {client.api_url} ({exc}); start one "
                "(bash infra/local/up.sh) and export PREFECT_API_URL (. infra/local/endpoints.env)"
            ) from None
        if existing is not None:
            if existing.type != pool_type:
                log.warning(
                    "work pool %s exists with type %s, not %s", name, existing.type, pool_type
                )
            return False
        template = base_job_template or default_base_job_template(pool_type, project_dir)
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
            )
        except ObjectAlreadyExists:  # created by a concurrent caller (e.g. a worker starting)
            return False
    return True


# --------------------------------------------------------------------------------------------
# prefect.yaml → the effective file for one pool


def _pool_entry(spec: dict[str, Any], work_pool: str) -> tuple[str, dict[str, Any]]:
    """(deployment name, work_pool block) for ``work_pool`` from definitions.work_pools."""
    pools = (spec.get("definitions") or {}).get("work_pools") or {}
    for key, block in pools.items():
        if block.get("name") == work_pool:
            return key, copy.deepcopy(block)
    return work_pool, {"name": work_pool}


def _deployment_pool_block(block: dict[str, Any]) -> dict[str, Any]:
    """The pool block as a deployment takes it: `type` is ours (for creating the pool)."""
    return {k: copy.deepcopy(v) for k, v in block.items() if k != "type"}


def _stage_of(entrypoint: str) -> str:
    return Path(entrypoint.split(":", 1)[0]).stem


def default_parameters(entrypoint: str, params: Any) -> dict[str, Any]:
    """Deployment parameters for one flow from the validated params.yaml."""
    stage = _stage_of(entrypoint)
    if stage == PIPELINE_ENTRY:
        return {"params": params.model_dump(mode="json", by_alias=True)}
    if stage not in SECTIONS:
        return {}
    section = params.section(stage)
    values: dict[str, Any] = {"config": section.model_dump(mode="json")}
    if stage == "pretrain":
        values["pool"] = section.pools[0]
    if stage == "scaling":  # the grid's loop settings and evaluation protocol
        values["pretrain"] = params.pretrain.model_dump(mode="json")
        values["finetune"] = params.finetune.model_dump(mode="json")
    return values


def effective_spec(
    spec: dict[str, Any],
    work_pool: str,
    project_dir: Path,
    params: Any | None = None,
    only: list[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """prefect.yaml rewritten for one pool; also the entrypoints skipped (file missing)."""
    spec = copy.deepcopy(spec)
    name, pool_block = _pool_entry(spec, work_pool)
    kept, skipped = [], []
    for deployment in spec.get("deployments") or []:
        entrypoint = deployment["entrypoint"]
        if only and _stage_of(entrypoint) not in only:
            continue
        if not (project_dir / entrypoint.split(":", 1)[0]).exists():
            skipped.append(entrypoint)
            continue
        deployment["name"] = name
        deployment["work_pool"] = _deployment_pool_block(pool_block)
        if params is not None:
            deployment["parameters"] = {
                **default_parameters(entrypoint, params),
                **(deployment.get("parameters") or {}),
            }
        kept.append(deployment)
    spec["deployments"] = kept
    return spec, skipped


# --------------------------------------------------------------------------------------------
# deploy


def _prefect_bin() -> str:
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


def _pool_type(spec: dict[str, Any], work_pool: str) -> str:
    _, block = _pool_entry(spec, work_pool)
    return block.get("type") or "process"


def deploy_all(
    work_pool: str = DEFAULT_POOL,
    only: list[str] | None = None,
    params_path: str | Path | None = "params.yaml",
    project_dir: str | Path = REPO,
    prefect_file: str | Path = "prefect.yaml",
    api_url: str | None = None,
    timeout_s: float = 600,
) -> DeployResult:
    """Deploy every flow of prefect.yaml to ``work_pool`` (created if missing).

    ``only`` restricts to stages (entrypoint file stems, e.g. ["fetch", "pipeline"]);
    ``params_path=None`` keeps the flows' own defaults instead of params.yaml's values.
    The server is ``api_url``, else $PREFECT_API_URL, else the active Prefect profile's.
    """
    project_dir = Path(project_dir).resolve()
    spec_path = project_dir / prefect_file
    if not spec_path.exists():
        raise ConfigError(f"{spec_path} not found; run from the repository root")
    spec = yaml.safe_load(spec_path.read_text())
    params = None
    if params_path is not None:
        params = load_params(project_dir / params_path)
    pool_type = _pool_type(spec, work_pool)
    created = ensure_work_pool(work_pool, pool_type, project_dir=project_dir, api_url=api_url)
    effective, skipped = effective_spec(spec, work_pool, project_dir, params, only)
    for entry in skipped:
        log.warning("skipping %s: its file does not exist yet", entry)
    result = DeployResult(work_pool, created, skipped=skipped)
    if not effective["deployments"]:
        return result
    with tempfile.TemporaryDirectory(prefix="clipshift-deploy-") as tmp:
        eff_path = Path(tmp) / "prefect.yaml"
        eff_path.write_text(yaml.safe_dump(effective, sort_keys=False))
        cmd = [_prefect_bin(), "--no-prompt", "deploy", "--all", "--prefect-file", str(eff_path)]
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        env["COLUMNS"] = "250"  # rich must not wrap the lines we parse for deployment names
        if api_url:
            env["PREFECT_API_URL"] = api_url
        proc = subprocess.run(
            cmd, cwd=project_dir, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    result.output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ConfigError(
            f"`prefect deploy` failed (exit {proc.returncode}); its output:\n"
            f"{result.output[-4000:]}\nCheck PREFECT_API_URL points at a running server "
            "(infra/local/up.sh starts one)"
        )
    # "<flow>/<deployment>" as Prefect reports them (a flow's name need not be its file's).
    result.deployed = re.findall(r"Deployment '([^']+)' successfully", result.output)
    return result


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipshift.deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    dep = sub.add_parser("all", help="deploy the flows of prefect.yaml (the default)")
    dep.add_argument("--pool", default=DEFAULT_POOL, help="work pool (default: %(default)s)")
    dep.add_argument("--only", help="comma-separated stages, e.g. fetch,pipeline")
    dep.add_argument("--params", default="params.yaml", help="default parameters from this file")
    dep.add_argument("--no-params", action="store_true", help="keep the flows' own defaults")
    pool = sub.add_parser("ensure-pool", help="create a work pool if it does not exist")
    pool.add_argument("--pool", default=DEFAULT_POOL)
    pool.add_argument("--type", default="process", choices=["process", "kubernetes"])
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "all")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ensure-pool":
            created = ensure_work_pool(args.pool, args.type)
            print(f"work pool {args.pool}: {'created' if created else 'exists'}")
            return 0
        result = deploy_all(
            work_pool=args.pool,
            only=args.only.split(",") if args.only else None,
            params_path=None if args.no_params else args.params,
            project_dir=Path.cwd(),
        )
    except ConfigError as err:
        print(f"clipshift deploy: error: {err}", file=sys.stderr)
        return 2
    for name in result.deployed:
        print(f"deployed {name} (work pool {result.work_pool})")
    for entry in result.skipped:
        print(f"skipped {entry} (file not found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
