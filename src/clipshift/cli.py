"""`clipshift <stage>`: validate params.yaml, then run the stage's Prefect flow.

DVC stage commands call this. Errors clipshift raises on purpose (bad params, missing data,
failed validation) print one clear message and exit with status 2, without a traceback.
Without a configured Prefect API, a stage starts Prefect's temporary server first thing, so
that its start-up overlaps the stage's imports (see clipshift.prefect_server).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from clipshift.errors import ClipshiftError

STAGES = (
    "fetch",
    "validate",
    "pretrain",
    "supervised",
    "finetune",
    "interpolate",
    "evaluate",
    "scaling",
    "report",
)
POOL_STAGES = ("pretrain", "supervised")  # run once per pool: `--pool` picks one


def _quiet_defaults() -> None:
    # Offline machines: no telemetry calls; tqdm bars of libraries stay ours alone.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Without PREFECT_API_URL each stage starts a temporary server; on a busy 2-core machine
    # it can take longer than Prefect's default 20 s to answer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
    # threads made training 3-4x slower (measured with pretrain under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    repo = Path.cwd()
    if (repo / "flows").is_dir() and str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


def _flow_for(stage: str) -> Callable:
    import importlib

    module = importlib.import_module(f"flows.{stage}")
    return getattr(module, f"{stage}_flow")


def run_stage(stage: str, params_path: str, pool: str | None = None) -> object:
    from clipshift import prefect_server

    server = prefect_server.start_early()  # starts up while the rest below imports
    from clipshift.config import load_params

    params = load_params(params_path)  # the whole file: a typo anywhere fails before any work
    config = None if stage == "pipeline" else params.section(stage)
    if stage in POOL_STAGES and pool is not None:
        listed = getattr(params, stage).pools
        if pool not in listed:
            raise ClipshiftError(
                f"pool '{pool}' is not in {stage}.pools {listed}; add it in params.yaml"
            )
    flow = _flow_for(stage)
    if server is not None:
        from clipshift import tracking

        tracking.warm_up_local_store()  # while the temporary Prefect server starts
        server.wait_until_ready()
    if stage == "pipeline":
        return flow(params=params)
    if stage == "pretrain" and pool is not None:
        return flow(config=config, pool=pool)
    if stage == "supervised":
        pools = [pool] if pool is not None else params.supervised.pools
        return [flow(config=config, pretrain=params.pretrain, pool=p) for p in pools]
    if stage == "scaling":
        return flow(config=config, pretrain=params.pretrain, finetune=params.finetune)
    return flow(config=config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipshift", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        cmd = sub.add_parser(stage, help=f"run the {stage} stage")
        if stage in POOL_STAGES:
            cmd.add_argument(
                "--pool",
                help=f"{stage} on this pool only (one of {stage}.pools; default: every pool)",
            )
    sub.add_parser("pipeline", help="run every stage in order as one Prefect flow")
    sub.add_parser("check-params", help="validate params.yaml and print the resolved config")
    deploy = sub.add_parser("deploy", help="create Prefect deployments for every flow")
    deploy.add_argument(
        "--pool", default="clipshift-local", help="work pool (default: %(default)s)"
    )
    deploy.add_argument("--only", help="comma-separated flow names (default: all)")
    promote = sub.add_parser(
        "promote", help="register an MLflow logged model and point an alias at that version"
    )
    promote.add_argument("model_id", help="the LoggedModel's id (m-...), as the MLflow UI shows")
    promote.add_argument(
        "--name", help="registered model (default: evaluate.registered_model in the params file)"
    )
    promote.add_argument("--alias", default="champion", help="alias to set (default: %(default)s)")
    return parser


def promote(args: argparse.Namespace) -> str:
    from clipshift.logged_models import promote as register

    name = args.name
    if name is None:
        from clipshift.config import load_params

        name = load_params(args.params).evaluate.registered_model
    version = register(args.model_id, name, alias=args.alias)
    return f"{args.model_id} is {name} v{version} @{args.alias}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_defaults()
    try:
        if args.command == "check-params":
            from clipshift.config import load_params

            print(load_params(args.params).model_dump_json(indent=2, by_alias=True))
            return 0
        if args.command == "deploy":
            from clipshift.deploy import deploy_all

            only = args.only.split(",") if args.only else None
            result = deploy_all(work_pool=args.pool, only=only, params_path=args.params)
            print(f"deployed {len(result.deployed)} deployment(s) on work pool {args.pool}")
            return 0
        if args.command == "promote":
            print(promote(args))
            return 0
        run_stage(args.command, args.params, getattr(args, "pool", None))
    except ClipshiftError as err:
        print(f"clipshift {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
