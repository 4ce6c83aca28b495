"""The study as a DVC experiment: what the Prefect `pipeline` deployment runs.

A run started from the Prefect UI's form becomes ``dvc exp run -n NAME -S key=value ...``, one
``-S`` for each setting that differs from params.yaml at the repository's last commit, so DVC
skips every stage whose inputs did not change, records the run as a named experiment that
``dvc exp show`` lists, and keeps the workspace's outputs and dvc.lock untouched.

Each run happens in a temporary clone of the repository (``git clone --shared``) that uses the
repository's DVC cache: outputs of unchanged stages are checked out from that cache, new ones
are saved to it, and the clone's lock, experiment refs and working files belong to that run
alone, so runs started side by side never trample each other or block ``dvc`` commands in the
checkout. When the run ends its experiment's ref is pushed into the repository (git; the
cache is shared) and the clone is removed. Uncommitted changes of the checkout are not
part of the experiment: its baseline is the last commit (a warning names the changed files).

The run's MLflow parent run is created here, named and tagged with the experiment's name,
before DVC starts; each stage's run nests under it (``CLIPSHIFT_PIPELINE_RUN_ID``). When the
experiment finishes, the parent run gets every setting, the experiment's metrics and its plots.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipshift import tracking
from clipshift.config import PipelineConfig, format_validation_error
from clipshift.errors import ClipshiftError, ConfigError

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"
# git ref names DVC accepts as experiment names, kept to a safe subset
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
# what `dvc repro` prints per stage (DVC 3): run, unchanged, or restored from the run cache
RAN_RE = re.compile(r"^Running stage '([^']+)'", re.M)
SKIPPED_RE = re.compile(
    r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)", re.M
)
# hydra's override grammar: characters a dictionary key must escape
HYDRA_KEY_SPECIAL = re.compile(r"([\\()\[\]{}:=, \t])")
PLAIN_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_MISSING = object()


@dataclass
class ExperimentRun:
    """What one experiment did."""

    name: str
    baseline_rev: str
    overrides: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rev: str = ""  # the experiment's commit
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""
    output: str = ""


# --------------------------------------------------------------------------------------------
# form values -> `-S key=value`


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every non-mapping value (lists are values, as DVC params)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def hydra_value(value: Any) -> str:
    """``value`` in hydra's override grammar (what ``dvc exp run -S`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_hydra_key(str(k))}:{hydra_value(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    raise ConfigError(f"cannot pass a {type(value).__name__} ({value!r}) to `dvc exp run -S`")


def _quoted(text: str) -> str:
    # Inside hydra's quotes only backslashes before a quote (or the end) are escapes.
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def _hydra_key(key: str) -> str:
    return key if PLAIN_KEY_RE.fullmatch(key) else HYDRA_KEY_SPECIAL.sub(r"\\\1", key)


def validated(values: Mapping[str, Any] | PipelineConfig) -> PipelineConfig:
    """The form's values as a PipelineConfig; a bad value fails with the pydantic message."""
    from pydantic import ValidationError

    if isinstance(values, PipelineConfig):
        values = values.model_dump(mode="json", by_alias=True)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def set_param_overrides(baseline: Mapping[str, Any], params: PipelineConfig) -> list[str]:
    """``key=value`` for each setting of ``params`` that differs from the ``baseline`` file
    (``+key=value`` where the file does not spell the key out). Values are compared after
    validation, so ``1e-3`` and ``0.001`` are the same setting."""
    old = leaves(validated(dict(baseline)).model_dump(mode="json", by_alias=True))
    new = leaves(params.model_dump(mode="json", by_alias=True))
    written = leaves(baseline)
    overrides = []
    for key, value in new.items():
        if old.get(key, _MISSING) == value:
            continue
        prefix = "" if key in written else "+"
        overrides.append(f"{prefix}{key}={hydra_value(value)}")
    return overrides


def check_overrides(baseline_file: Path, overrides: list[str], params: PipelineConfig) -> None:
    """Apply ``overrides`` to a copy of the baseline file the way DVC will, and fail unless the
    result is exactly ``params``: nothing starts on settings other than the form's."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory(prefix="clipshift-params-") as tmp:
        copy = Path(tmp) / PARAMS_FILE
        shutil.copyfile(baseline_file, copy)
        try:
            if overrides:
                apply_overrides(copy, overrides)
        except InvalidArgumentError as err:
            cause = err.__cause__ or err
            raise ConfigError(f"DVC cannot apply the settings {overrides}: {cause}") from None
        result = validated(yaml.safe_load(copy.read_text()))
    want = leaves(params.model_dump(mode="json", by_alias=True))
    got = leaves(result.model_dump(mode="json", by_alias=True))
    wrong = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if wrong:
        raise ConfigError(
            f"`dvc exp run -S` would not set {wrong} to the form's values "
            f"(form: {[want.get(k) for k in wrong]}, DVC: {[got.get(k) for k in wrong]}); "
            "change them in params.yaml and commit instead"
        )


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"experiment name {name!r}: use letters, digits, '-' and '_' (at most 80, starting "
            "with a letter or digit)"
        )
    return name


# --------------------------------------------------------------------------------------------
# git and dvc


def _run(cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=dict(env) if env else None, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ClipshiftError(
            f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc.stdout


def _dvc() -> str:
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


def baseline_rev(repo: Path) -> str:
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


def committed_params(repo: Path, rev: str) -> tuple[dict[str, Any], str]:
    """params.yaml at ``rev`` (parsed, and its text)."""
    text = _run(["git", "show", f"{rev}:{PARAMS_FILE}"], repo)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{PARAMS_FILE} at {rev[:7]} does not hold a mapping")
    return data, text


def existing_names(repo: Path) -> set[str]:
    """Names of the experiments the repository holds (refs/exps/<rev>/<name>)."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], repo).split()
    return {ref.rsplit("/", 1)[-1] for ref in refs if ref.count("/") >= 4}


def uncommitted(repo: Path) -> list[str]:
    out = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return [line[3:] for line in out.splitlines() if line.strip()]


def cache_dir(repo: Path) -> Path:
    """The repository's DVC cache folder (created if it is the default and missing)."""
    path = Path(_run([_dvc(), "cache", "dir"], repo).strip())
    path = path if path.is_absolute() else repo / path
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def temporary_clone(repo: Path, rev: str) -> Iterator[Path]:
    """A clone of ``repo`` at ``rev`` sharing its git objects and DVC cache; removed after.
    It lives in the repository's .dvc/tmp (ignored by git and DVC), on the cache's file system,
    so DVC can link outputs from the cache instead of copying them where the file system can."""
    scratch = repo / ".dvc" / "tmp" / "clipshift-exps"
    scratch.mkdir(parents=True, exist_ok=True)
    parent = Path(tempfile.mkdtemp(prefix="exp-", dir=scratch))
    clone = parent / "repo"
    try:
        _run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(clone)], repo)
        _run(["git", "checkout", "--quiet", "--detach", rev], clone)
        _run([_dvc(), "cache", "dir", "--local", str(cache_dir(repo))], clone)
        _git_identity(clone)
        # the rendered emoji art and downloads: a re-run fetch finds them as in the checkout
        link = clone / ".cache"
        if (repo / ".cache").exists() and not (link.exists() or link.is_symlink()):
            link.symlink_to(repo / ".cache")
        yield clone
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _git_identity(clone: Path) -> None:
    """DVC commits each experiment: give the clone an author if git has none configured."""
    for key, value in (("user.name", "clipshift"), ("user.email", "clipshift@localhost")):
        if subprocess.run(["git", "config", key], cwd=clone, capture_output=True).returncode:
            _run(["git", "config", key, value], clone)


def stream(cmd: list[str], cwd: Path, env: Mapping[str, str], echo: Callable[[str], None]) -> str:
    """Run ``cmd``, passing each output line to ``echo`` as it comes; the whole output, or a
    ClipshiftError with its tail if it fails."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            echo(line.rstrip("\n"))
    output = "".join(lines)
    if proc.returncode != 0:
        raise ClipshiftError(
            f"`{' '.join(cmd[:4])} ...` failed (exit {proc.returncode}); its last lines:\n"
            f"{output[-4000:]}"
        )
    return output


def stages_of(output: str) -> tuple[list[str], list[str]]:
    """(stages that ran, stages DVC skipped) from `dvc exp run`'s output."""
    ran = list(dict.fromkeys(RAN_RE.findall(output)))
    skipped = [s for s in dict.fromkeys(SKIPPED_RE.findall(output)) if s not in ran]
    return ran, skipped


def metrics_of(workdir: Path) -> dict[str, float]:
    """Every number of the DVC metrics files under ``metrics/``, keyed ``<file>/<key>``."""
    out: dict[str, float] = {}
    root = workdir / "metrics"
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        if path.name.startswith("unsent-") or path.parts[len(root.parts)] == "seeds":
            continue  # metrics MLflow never took; other seeds' studies (not this run's)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stem = path.relative_to(root).with_suffix("").as_posix()
        for key, value in tracking.flatten(data).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    out[_metric_key(f"{stem}/{key}")] = float(value)
    return out


def _metric_key(key: str) -> str:
    # MLflow metric names: alphanumerics, '_', '-', '.', ' ', ':' and '/'
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """A local SQLite store's relative path resolved against ``base`` (the clone's working
    directory is not the checkout's; its runs must land in the checkout's store)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    return uri


# --------------------------------------------------------------------------------------------
# MLflow parent run


def open_parent_run(name: str, baseline: str, tags: Mapping[str, str]) -> str:
    client = tracking.mlflow_client()
    exp_id = tracking.experiment_id(client)
    run = client.create_run(
        exp_id,
        run_name=f"pipeline-{name}",
        tags={
            "clipshift.kind": "pipeline",
            "dvc.exp_name": name,
            "dvc.exp_baseline_rev": baseline,
            "git.commit": baseline,
            **tags,
        },
    )
    return str(run.info.run_id)


def finish_parent_run(
    run_id: str, params: PipelineConfig, result: ExperimentRun, clone: Path | None, status: str
) -> None:
    client = tracking.mlflow_client()
    tracker = tracking.MlflowTracker(client, run_id)
    tracker.log_params(tracking.flatten(params.model_dump(mode="json", by_alias=True)))
    tracker.set_tags(
        {
            "dvc.exp_rev": result.rev,
            "dvc.set_params": json.dumps(result.overrides)[:5000],
            "dvc.stages_ran": ",".join(result.ran),
            "dvc.stages_skipped": ",".join(result.skipped),
        }
    )
    if result.metrics:
        tracker.log_metrics(result.metrics)
        tracker.flush()
    if clone is not None and (clone / "plots").is_dir():
        tracker.log_artifact(clone / "plots", "plots")
    client.set_terminated(run_id, status)


# --------------------------------------------------------------------------------------------
# the experiment


def run_experiment(
    params: PipelineConfig | Mapping[str, Any],
    name: str,
    repo: str | Path = ".",
    echo: Callable[[str], None] = print,
    tags: Mapping[str, str] | None = None,
    on_parent: Callable[[str], None] | None = None,
) -> ExperimentRun:
    """Run the study with ``params`` as DVC experiment ``name`` of ``repo``'s last commit.

    Everything that can be refused is checked before anything starts: the values (pydantic),
    the name (free and valid), and that DVC's ``-S`` gives exactly these values.
    ``on_parent`` gets the MLflow parent run's id as soon as it exists."""
    repo = Path(repo).resolve()
    params = validated(params)
    check_name(name)
    if name in existing_names(repo):
        raise ConfigError(f"an experiment named '{name}' exists; pick another name")
    rev = baseline_rev(repo)
    baseline, text = committed_params(repo, rev)
    overrides = set_param_overrides(baseline, params)
    with tempfile.TemporaryDirectory(prefix="clipshift-params-") as tmp:
        (Path(tmp) / PARAMS_FILE).write_text(text)
        check_overrides(Path(tmp) / PARAMS_FILE, overrides, params)
    if dirty := uncommitted(repo):
        log.warning("experiment %s runs on commit %s, without the uncommitted %s", name, rev[:7],
                    dirty)  # fmt: skip
    uri = absolute_tracking_uri(tracking.tracking_uri(), repo)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the parent run and the stages share one store
    parent = open_parent_run(name, rev, tags or {})
    if on_parent:
        on_parent(parent)
    result = ExperimentRun(name, rev, overrides, mlflow_run_id=parent)
    try:
        with temporary_clone(repo, rev) as clone:
            _reproduce(clone, result, echo)
            _publish(clone, repo, result)
            finish_parent_run(parent, params, result, clone, "FINISHED")
    except BaseException:
        _mark_failed(parent, params, result)
        raise
    return result


def _mark_failed(run_id: str, params: PipelineConfig, result: ExperimentRun) -> None:
    """Best effort: the experiment's own error is the one to report."""
    try:
        finish_parent_run(run_id, params, result, None, "FAILED")
    except Exception:  # noqa: BLE001
        log.exception("could not mark MLflow run %s failed", run_id)


def _reproduce(clone: Path, result: ExperimentRun, echo: Callable[[str], None]) -> None:
    env = {**os.environ, "CLIPSHIFT_PIPELINE_RUN_ID": result.mlflow_run_id}
    # the clone's own code runs its stages (an editable install would point at the checkout)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(clone / "src"), str(clone), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_dvc(), "exp", "run", "--name", result.name]
    for override in result.overrides:
        cmd += ["--set-param", override]
    echo(f"dvc exp run --name {result.name} " + " ".join(f"-S {o}" for o in result.overrides))
    t0 = time.monotonic()
    result.output = stream(cmd, clone, env, echo)
    result.ran, result.skipped = stages_of(result.output)
    echo(f"experiment {result.name}: {time.monotonic() - t0:.0f} s; ran {result.ran or 'nothing'}")
    result.rev = _run(["git", "rev-parse", f"refs/exps/{_exp_ref(clone, result.name)}"], clone)
    result.rev = result.rev.strip()
    result.metrics = metrics_of(clone)


def _exp_ref(clone: Path, name: str) -> str:
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], clone).split()
    found = [r for r in refs if r.endswith(f"/{name}") and r.count("/") >= 4]
    if not found:
        raise ClipshiftError(f"`dvc exp run` finished but made no experiment named '{name}'")
    return found[0].removeprefix("refs/exps/")


def _publish(clone: Path, repo: Path, result: ExperimentRun) -> None:
    """Push the experiment's ref (and so its commit) into the checkout, whose DVC cache
    already holds its outputs, so `dvc exp show` there lists it."""
    ref = f"refs/exps/{_exp_ref(clone, result.name)}"
    _run(["git", "push", "--quiet", "origin", f"{ref}:{ref}"], clone)
    if result.name not in existing_names(repo):
        raise ClipshiftError(f"experiment '{result.name}' did not reach {repo}")
