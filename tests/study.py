"""The tiny study as a user's checkout: built once per test session, copied cheaply per module.

`tiny_study_repo` makes the baseline: the repository's files in a fresh git repo with the
tiny params, `dvc repro` run (minutes on 2 cores) and committed. The session fixture
``tiny_study`` (conftest) runs it once; each module that needs a checkout of its own takes
`study_checkout`, a git clone of the baseline whose DVC cache is a hard-linked copy of the
baseline's (its new outputs and run-cache entries stay its own) with the outputs checked out:
seconds, and no stage runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from clipshift.config import PipelineConfig
from tests.conftest import REPO
from tests.tiny import tiny_params

# Variables of the test's own process that a user's checkout does not have.
FOREIGN_ENV = ("CLIPSHIFT_PIPELINE_RUN_ID", "CLIPSHIFT_WORKERS", "PREFECT_API_URL")


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return proc.stdout


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def study_env(repo: Path) -> dict[str, str]:
    """The environment a user's `dvc` commands get in ``repo``: its own MLflow store, the
    study's own defaults (stages side by side in workers)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    for name in FOREIGN_ENV:
        env.pop(name, None)
    return env


def _link_art_cache(repo: Path) -> None:
    """The rendered emoji art shared with the repository (no npm install in a copy); a
    symlink is not a folder to .gitignore's "/.cache/", so it is excluded by name."""
    if (REPO / ".cache").exists():
        (repo / ".cache").symlink_to((REPO / ".cache").resolve())
    (repo / ".git" / "info").mkdir(parents=True, exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text("/.cache\n")


def copy_with_tiny_params(dest: Path) -> None:
    """The repository's tracked and untracked-not-ignored files in ``dest``, without the
    study's committed outputs, and a params.yaml holding every knob at its tiny value (dvc.yaml's
    matrix reads pretrain.pools from it)."""
    for name in git(REPO, "ls-files", "-co", "--exclude-standard").split():
        src = REPO / name
        if src.is_file() and not name.startswith(("metrics/", "plots/", "reports/", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    full = PipelineConfig.model_validate(tiny_params()).model_dump(by_alias=True, mode="json")
    (dest / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))


def tiny_study_repo(dest: Path) -> tuple[Path, dict[str, str]]:
    """The repository's tracked files in a fresh git repo with the tiny params, `dvc repro`
    run and committed: the baseline a UI run starts from."""
    copy_with_tiny_params(dest)
    git(dest, "init", "-q")
    _link_art_cache(dest)
    env = study_env(dest)
    run(["dvc", "repro"], dest, env)
    git(dest, "add", "-A")
    git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny baseline")
    return dest, env


def study_checkout(baseline: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """A checkout of the ``baseline`` repo of its own, up to date, without running a stage:
    a git clone, the baseline's DVC cache hard-linked into it (cache files are never changed
    in place, so the copies stay independent), `dvc checkout` of the outputs."""
    git(dest.parent, "clone", "-q", str(baseline), str(dest))
    _link_art_cache(dest)
    shutil.copytree(baseline / ".dvc" / "cache", dest / ".dvc" / "cache", copy_function=os.link)
    env = study_env(dest)
    run(["dvc", "checkout", "--quiet"], dest, env)
    return dest, env


def exp_show(repo: Path, env: dict) -> dict[str, dict[str, Any]]:
    """name -> {"params": params.yaml's values, "metrics": {file: data}} of each experiment."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                data = node["data"]
                found[node["name"]] = {
                    "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                    "metrics": {k: v.get("data") for k, v in (data.get("metrics") or {}).items()},
                }
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(shown)
    return found
