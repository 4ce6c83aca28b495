"""Orchestration overhead: ``dvc repro`` → ``clipshift <stage>`` → Prefect flow + MLflow run,
vs the same library call in plain Python, on the default config.

The stage is ``validate`` (Great Expectations suites, leakage and duplicate checks over every
dataset): it runs standalone on the built-in data, needs no trained model, and does real work.
Everything runs in a scratch copy of the project (under ``--work-dir``; a DVC repo made with
``dvc init --no-scm``, ``--data-dir`` copied in as its data/fetch, its own ``mlflow.db`` and
``PREFECT_HOME``), so the real repository, its data and its tracking store are never touched.
Each side is a fresh process, timed from launch to exit (interpreter start and imports
included on both sides):

- ours: ``dvc repro --force --single-item validate`` (what a user runs; no
  ``PREFECT_API_URL`` is set, as on a laptop, so the stage starts Prefect's temporary server:
  ``clipshift.prefect_server``);
- peer: ``python -c 'run_validate(load_params().validate_)'`` (the bare library call);
- also timed: ``clipshift validate`` alone (Prefect + MLflow, no DVC), and a no-op
  ``dvc repro validate`` (nothing changed: DVC only checks hashes; target ≤ 3 s);
- with ``--prefect-server``: the same ``dvc repro`` against a running ``prefect server``
  (the deployed set-up, as ``infra/local/up.sh`` starts it).

ratio = orchestrated / plain wall time (lower is better; target ≤ 1.10, i.e. ≤ 10 % overhead).
Each side's CPU seconds (user + sys of the process tree) are recorded too (``cpu_*``): on a
shared machine they move far less with the load than wall time does.

    .venv/bin/python bench/bench_orchestration.py [--repeats 3] [--prefect-server]
    .venv/bin/python bench/bench_orchestration.py --smoke   # seconds, see below

``--smoke`` checks that every command still runs, in seconds: the plain call runs for real on
a tiny world, while DVC and the CLI run dry (``dvc repro --dry``, ``clipshift validate
--help``) after the stage's dependencies in dvc.yaml are checked to exist. A real stage run
through Prefect and MLflow costs 30–45 CPU s on 2 cores (the temporary server, MLflow's SQLite
schema), and the slow tests cover it (tests/test_dvc_repro.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import common as C
import smoke

NAME = "orchestration"
STAGE = "validate"
PLAIN = (
    "from clipshift.config import load_params; "
    "from clipshift.stages.validate import run_validate; "
    "run_validate(load_params('params.yaml').validate_)"
)
COPY = ["dvc.yaml", "dvc.lock", "params.yaml", "flows", "src"]
# outputs of validate (the forced runs re-make them) and the uncached metrics of the two stages
COPY_IF_PRESENT = ["data/validate", "metrics/fetch.json", "metrics/validate.json"]


def parser() -> argparse.ArgumentParser:
    p = C.base_parser(__doc__.splitlines()[0], Path("/tmp/clipshift-bench-orch"))
    p.add_argument("--workdir", dest="work_dir", type=Path, help=argparse.SUPPRESS)  # old name
    p.add_argument("--prefect-server", action="store_true", help="also time against a server")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command")
    return p


def bin_dir() -> Path:
    return C.OURS_PYTHON.parent


def make_copy(workdir: Path, data_dir: Path) -> Path:
    """A scratch DVC project with the real dvc.yaml and code, and ``data_dir`` as its
    data/fetch (fresh each run)."""
    repo = workdir / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    if not (data_dir / "manifest.json").exists():
        raise SystemExit(f"no fetched data in {data_dir}: run `dvc repro fetch validate` first")
    copy_tree_or_file(data_dir, repo / "data" / "fetch")
    for rel in COPY + COPY_IF_PRESENT:
        src = C.REPO / rel
        if src.exists():
            copy_tree_or_file(src, repo / rel)
        elif rel in COPY:
            raise SystemExit(f"{src} is missing from the repository")
    dvc, env = str(bin_dir() / "dvc"), {**os.environ, "DVC_NO_ANALYTICS": "1"}
    C.timed_cmd([dvc, "init", "--no-scm", "-q"], env=env, cwd=repo)
    C.timed_cmd([dvc, "config", "core.analytics", "false"], env=env, cwd=repo)
    # fetch's outputs must be in this copy's cache, or DVC sees the stage as changed
    C.timed_cmd([dvc, "commit", "--force", "fetch"], env=env, cwd=repo)
    return repo


def copy_tree_or_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(src, dst)


def stage_env(repo: Path, threads: int, api_url: str | None = None) -> dict[str, str]:
    env = C.thread_env(threads)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(repo.parent / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for var in ("PREFECT_API_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(var, None)  # no outside services unless asked for
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(repo: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = (repo.parent / "prefect-server.log").open("w")
    proc = subprocess.Popen(
        [str(bin_dir() / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as one, nothing else
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    raise SystemExit(f"prefect server did not answer on {url} in 120 s (see prefect-server.log)")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def children_cpu_s() -> float:
    """CPU seconds (user + sys) of every finished, waited-for descendant so far: dvc, the stage
    process and the Prefect server it stops and waits for all count."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_recorder(cpu: dict[str, list[float]]):
    """Wrap a side so that its CPU seconds land in ``cpu[name]`` next to its wall time."""

    def wrap(name: str, side):
        def run(i: int) -> float:
            before = children_cpu_s()
            wall = side(i)
            cpu.setdefault(name, []).append(children_cpu_s() - before)
            return wall

        return run

    return wrap


def cpu_summary(cpu: dict[str, list[float]], ours: str, peer: str = "plain") -> dict[str, Any]:
    """Median CPU seconds per side and the CPU overhead: unlike wall time, it hardly depends
    on what else the shared machine runs, and it is what a busy machine pays."""
    medians = {name: C.median(values) for name, values in cpu.items()}
    return {
        "cpu_s": medians,
        "cpu_runs": cpu,
        "cpu_overhead_s": medians[ours] - medians[peer],
        "cpu_ratio": medians[ours] / medians[peer],
    }


def check_stage_deps(repo: Path, stage: str) -> None:
    """Fail now, naming them, if files the stage depends on are gone (a module moved without
    dvc.yaml following): DVC would fail only in the first timed run, and a dry run not at all."""
    import yaml

    deps = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
    missing = [dep for dep in deps if not (repo / dep).exists()]
    if missing:
        raise SystemExit(f"dvc.yaml: stage '{stage}' depends on missing {missing}")


def commands(args) -> dict[str, list[str]]:
    """The timed commands; dry in a smoke run (see the module doc)."""
    dvc, dry = str(bin_dir() / "dvc"), ["--dry"] if args.smoke else []
    return {
        "forced": [dvc, "repro", *dry, "--force", "--single-item", STAGE],
        "noop": [dvc, "repro", *dry, STAGE],
        "cli": [str(bin_dir() / "clipshift"), STAGE, *(["--help"] if args.smoke else [])],
        "plain": [str(C.OURS_PYTHON), "-c", PLAIN],
    }


def compare(args) -> dict[str, Any]:
    repo = make_copy(args.work_dir, args.data_dir)
    check_stage_deps(repo, STAGE)
    env = stage_env(repo, args.threads)
    log = args.work_dir / "commands.log"
    log.unlink(missing_ok=True)
    cmd = commands(args)

    def timed(command: list[str], run_env: dict[str, str] | None = None) -> float:
        return C.timed_cmd(
            command, env=run_env or env, cwd=repo, timeout=args.timeout, log_file=log
        )

    if not args.smoke:
        # warm-up: first import of everything, DVC's hash cache of data/fetch, MLflow's schema
        timed(cmd["forced"])
    cpu: dict[str, list[float]] = {}
    with_cpu = cpu_recorder(cpu)
    sides = {
        "dvc_repro": with_cpu("dvc_repro", lambda i: timed(cmd["forced"])),
        "plain": with_cpu("plain", lambda i: timed(cmd["plain"])),
        "cli": with_cpu("cli", lambda i: timed(cmd["cli"])),
    }
    load_start = C.machine_info()["load_average"]
    values = C.alternate(sides, args.repeats, C.say)
    if not args.smoke:  # (a dry run changes nothing)
        timed(cmd["forced"])  # dvc.lock now matches the workspace: the next repro has no work
    noop = [timed(cmd["noop"]) for _ in range(args.repeats)]
    extra: dict[str, Any] = {}
    if args.prefect_server:
        extra = server_variant(args, repo, timed, cmd["forced"])
    plain = C.median(values["plain"])
    orchestrated = C.median(values["dvc_repro"])
    return C.build_result(
        values["dvc_repro"],
        values["plain"],
        "seconds wall (ours = `dvc repro` of the stage through Prefect + MLflow, peer = the "
        "same library call in plain Python; ratio = ours/peer, lower is better)",
        higher_is_better=False,
        target=1.10,
        stage=STAGE,
        config="params.yaml defaults",
        overhead_s=orchestrated - plain,
        overhead_pct=100 * (orchestrated - plain) / plain,
        cli_s=C.median(values["cli"]),
        cli_runs=values["cli"],
        cli_overhead_s=C.median(values["cli"]) - plain,
        dvc_share_s=orchestrated - C.median(values["cli"]),
        prefect_mode="temporary server per process (no PREFECT_API_URL), started at launch",
        commands={name: shlex.join(command) for name, command in cmd.items()},
        **cpu_summary(cpu, "dvc_repro"),
        noop_dvc_repro_s=C.median(noop),
        noop_dvc_repro_runs=noop,
        noop_spread=C.spread(noop),
        noop_target_s=3.0,
        noop_target_met=C.median(noop) <= 3.0,
        threads=args.threads,
        workdir=str(repo),
        load_average_start=load_start,
        machine=C.machine_info(args.threads),
        smoke=args.smoke,
        **extra,
    )


def server_variant(args, repo: Path, timed, forced: list[str]) -> dict[str, Any]:
    """dvc repro against a running Prefect server, alternated with the plain call again."""
    base = stage_env(repo, args.threads)
    server, url = start_prefect_server(repo, base)
    try:
        env = stage_env(repo, args.threads, url)
        timed(forced, env)  # warm-up: the server's first flow run creates its tables' rows
        cpu: dict[str, list[float]] = {}
        with_cpu = cpu_recorder(cpu)
        runs = C.alternate(
            {
                "dvc_repro_server": with_cpu("dvc_repro_server", lambda i: timed(forced, env)),
                "plain": with_cpu("plain", lambda i: timed([str(C.OURS_PYTHON), "-c", PLAIN])),
            },
            args.repeats,
            C.say,
        )
    finally:
        stop(server)
    ours, plain = C.median(runs["dvc_repro_server"]), C.median(runs["plain"])
    server_cpu = cpu_summary(cpu, "dvc_repro_server")  # the server's own CPU is not counted
    return {
        **{f"server_{key}": value for key, value in server_cpu.items()},
        "server_dvc_repro_s": ours,
        "server_plain_s": plain,
        "server_ratio": ours / plain,
        "server_spread": C.spread(C.paired_ratios(runs["dvc_repro_server"], runs["plain"])),
        "server_overhead_pct": 100 * (ours - plain) / plain,
        "server_runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(parser(), argv)
    smoke.prepare(args)
    result = compare(args)
    path = C.write_result(NAME, result, args.results_dir)
    print(C.summary_line(NAME, result))
    print(
        f"overhead {result['overhead_s']:.1f} s ({result['overhead_pct']:.0f} %), "
        f"{result['cpu_overhead_s']:.1f} CPU s; "
        f"no-op dvc repro {result['noop_dvc_repro_s']:.2f} s"
        + (
            f"; with a Prefect server: ratio {result['server_ratio']:.3f} "
            f"({result['server_overhead_pct']:.0f} %)"
            if "server_ratio" in result
            else ""
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
