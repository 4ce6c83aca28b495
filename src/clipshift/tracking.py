"""MLflow plumbing: one parent run per pipeline, one child run per stage, lineage tags.

The default store is ``sqlite:///mlflow.db`` with artifacts under ``./mlartifacts``;
``MLFLOW_TRACKING_URI`` points everything at a server instead. A pipeline's parent run is found
by its key — the git commit, the params.yaml hash and the DVC experiment name — so the separate
processes that ``dvc repro`` starts for each stage nest under the same parent. Set
``CLIPSHIFT_PIPELINE_RUN_ID`` to nest under a given run instead (the Prefect pipeline flow does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from clipshift.errors import ClipshiftError
from clipshift.io_utils import write_json_atomic

log = logging.getLogger(__name__)

EXPERIMENT = os.environ.get("CLIPSHIFT_EXPERIMENT", "clipshift")
PIPELINE_KEY_TAG = "clipshift.pipeline_key"
SECRET_ENV_MARKERS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL")
# The longest a log call holds up training waiting for MLflow to take its metrics.
METRIC_WAIT_S = 2.0
# At the end of a stage, how long to wait for a down MLflow server to come back with the
# metrics still buffered before saving them locally instead.
FLUSH_TIMEOUT_ENV = "CLIPSHIFT_MLFLOW_FLUSH_TIMEOUT_S"
DEFAULT_FLUSH_TIMEOUT_S = 300.0


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.rstrip()  # a porcelain line starts with a meaningful space
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_outputs(lock: str | Path = "dvc.lock") -> list[str]:
    """What the pipeline itself writes: ``lock`` and every stage output it records."""
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    outs = [o["path"] for stage in stages.values() for o in stage.get("outs") or []]
    return [str(lock), *outs]


def _is_under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def git_changes(outputs: bool = False) -> list[str]:
    """``git status --porcelain`` lines of the tracked files that differ from the commit.

    Without ``outputs``, files the pipeline writes (:func:`pipeline_outputs`) are left out: a
    run that rewrites committed metrics has not changed what produced them, and calling every
    stage after the first "dirty" would hide real source edits among them."""
    lines = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    if outputs:
        return lines
    written = pipeline_outputs()
    return [line for line in lines if not _is_under(line[3:].split(" -> ")[-1], written)]


def git_state() -> dict[str, str]:
    """The commit, and whether any tracked file other than a pipeline output differs from it."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git_changes())
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def pipeline_key(params_path: str | Path = "params.yaml") -> str:
    parts = [
        git_state()["git.commit"],
        file_sha256(params_path),
        os.environ.get("DVC_EXP_NAME", ""),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def dvc_dep_hashes(stage: str, root: str | Path = ".") -> dict[str, str]:
    """md5 of each dep of ``stage`` as dvc.lock records it (as the upstream stage's out).

    dvc.lock is rewritten only after a stage finishes, so the current hashes of our deps are
    the outs of the stages upstream of us; a dep with no record yet is reported as 'unknown'.
    """
    root = Path(root)
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
        lock = yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return {}
    known: dict[str, str] = {}
    for entry in lock.values():
        for item in [*entry.get("outs", []), *entry.get("deps", [])]:
            known.setdefault(item["path"], item.get("md5", "unknown"))
    base = stage.split("@", 1)[0]
    deps = spec.get(base, {}).get("deps", [])
    return {f"dvc.dep.{d}": known.get(d, "unknown") for d in deps if isinstance(d, str)}


def lineage_tags(stage: str) -> dict[str, str]:
    tags = {
        **git_state(),
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "clipshift.stage": stage,
    }
    tags.update(dvc_dep_hashes(stage))
    return {k.replace("@", "_at_"): v for k, v in tags.items()}


def redact(value: Any) -> Any:
    """Replace any secret found in the environment by '***' before it reaches MLflow."""
    text = str(value)
    for name, secret in os.environ.items():
        if secret and len(secret) >= 8 and any(m in name.upper() for m in SECRET_ENV_MARKERS):
            text = text.replace(secret, "***")
    return text


class MlflowTracker:
    """A Tracker over one MLflow run. Metrics never block training on MLflow: they are queued
    and sent by a background thread; ``log_metrics`` waits at most ``wait_s`` for its own batch,
    and not at all while an earlier send is still stuck (the MLflow client retries a down server
    for minutes). What fails to send stays queued and goes out with the next batch, so an
    outage only delays metrics; ``flush`` sends the rest and reports what is still pending."""

    def __init__(self, client: Any, run_id: str, wait_s: float = METRIC_WAIT_S) -> None:
        self.client = client
        self.run_id = run_id
        self.wait_s = wait_s
        self._pending: list[Any] = []
        self._lock = threading.Lock()  # guards _pending and _sender
        self._send_lock = threading.Lock()  # one send at a time (sender thread or flush)
        self._sender: threading.Thread | None = None
        self._outage_logged = False

    def __getstate__(self) -> dict[str, Any]:
        # Picklable without its locks and thread: Prefect hashes task inputs by pickling them.
        state = self.__dict__.copy()
        for name in ("_lock", "_send_lock", "_sender"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._send_lock, self._sender = threading.Lock(), threading.Lock(), None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
            if self._sender is not None and self._sender.is_alive():
                return  # a send is in flight (slow or down server): it picks these up
            self._sender = threading.Thread(target=self._send_pending, daemon=True)
            self._sender.start()
            sender = self._sender
        sender.join(self.wait_s)

    def queue_metrics(self, metrics: list[Any]) -> None:
        """Queue ready-made MLflow ``Metric`` entities (e.g. linked to a model and a dataset);
        they go out with the next send, at the latest when the run closes."""
        with self._lock:
            self._pending += metrics

    def _send_pending(self) -> None:
        try:
            self._send(raise_on_error=False)
        except Exception:  # noqa: BLE001 - a sender thread must never die loudly
            log.exception("MLflow metric sender failed")

    def _send(self, raise_on_error: bool) -> int:
        with self._send_lock:
            while True:
                with self._lock:
                    batch = self._pending[:1000]
                if not batch:
                    return 0
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as exc:  # noqa: BLE001 - any transport error means "try later"
                    if raise_on_error:
                        raise
                    self._log_outage(exc)
                    return len(self._pending)
                with self._lock:  # only appends happen meanwhile: the batch is still in front
                    del self._pending[: len(batch)]
                if self._outage_logged:
                    log.warning("MLflow reachable again; buffered metrics sent")
                    self._outage_logged = False

    def _log_outage(self, exc: Exception) -> None:
        if not self._outage_logged:
            log.warning(
                "MLflow unreachable (%s); %d metrics buffered, training goes on and they are "
                "re-sent with the next ones",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                len(self._pending),
            )
            self._outage_logged = True

    def flush(self, raise_on_error: bool = True, timeout_s: float | None = None) -> int:
        """Send everything queued; return how many metrics are still unsent.

        Waits up to ``timeout_s`` (None: as long as it takes) for a send already in flight,
        e.g. one retrying against a restarting server, then tries once more.
        """
        sender = self._sender
        if sender is not None:
            sender.join(timeout_s)
            if sender.is_alive():
                return len(self._pending)
        return self._send(raise_on_error)

    def unsent(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.to_dictionary() for m in self._pending]

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key.replace("@", "_at_"), redact(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(obj, indent=2, default=str), name)

    def child(self, name: str, tags: dict[str, str]) -> contextlib.AbstractContextManager:
        """A run nested under this one (see :func:`child_run`)."""
        return child_run(self, name, tags)


def mlflow_client() -> Any:
    """An MlflowClient of the tracking store: MLFLOW_TRACKING_URI, else the local SQLite one."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def warm_up_local_store() -> None:
    """Import MLflow and open a local store (its SQLite schema check takes ~1 s), so that a
    stage started meanwhile opens its run on the cached store. A server store is left alone: its
    client is cheap, and an outage must fail inside the stage's run, where it is reported."""
    if not _is_local_store(tracking_uri()):
        return
    try:
        mlflow_client().get_experiment_by_name(EXPERIMENT)
    except Exception:  # noqa: BLE001 - the stage's own run reports any store problem
        return


def open_pipeline_run(params_path: str | Path = "params.yaml") -> str:
    """The id of this pipeline's parent run (see :func:`pipeline_run_id`), created if needed."""
    client = mlflow_client()
    return pipeline_run_id(client, experiment_id(client), params_path)


def experiment_id(client: Any, name: str = EXPERIMENT) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(tracking_uri()):
        location = Path("mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - re-raised unless another run won the race
        exp = client.get_experiment_by_name(name)  # created by a run started at the same time
        if exp is None:
            raise exc from None
        return exp.experiment_id


def pipeline_run_id(client: Any, exp_id: str, params_path: str | Path = "params.yaml") -> str:
    """The parent run of this pipeline: given by env, found by key, or created."""
    if run_id := os.environ.get("CLIPSHIFT_PIPELINE_RUN_ID"):
        return run_id
    key = pipeline_key(params_path)
    found = _pipeline_runs(client, exp_id, key)
    if found:
        return found[0]
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = client.create_run(
        exp_id,
        run_name=f"pipeline-{exp_name or 'workspace'}-{key[:6]}",
        tags={PIPELINE_KEY_TAG: key, "clipshift.kind": "pipeline", **git_state()},
    )
    # Two stages started at once (two pipelines, parallel DVC stages) may both have found no
    # parent and created one each: all of them then agree on the oldest and drop their own.
    winner = _pipeline_runs(client, exp_id, key)[0]
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
    return winner


def _pipeline_runs(client: Any, exp_id: str, key: str) -> list[str]:
    """Ids of the live pipeline runs with this key, oldest first (ties by id)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=100
    )
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[MlflowTracker]:
    """A child run of the pipeline run for one stage; FAILED if the body raises."""
    client = mlflow_client()
    exp_id = experiment_id(client)
    parent = parent_run_id or pipeline_run_id(client, exp_id)
    tags = {"mlflow.parentRunId": parent, **lineage_tags(stage), **(extra_tags or {})}
    run = client.create_run(exp_id, run_name=run_name or stage, tags=tags)
    tracker = MlflowTracker(client, run.info.run_id)
    if params:
        tracker.log_params(flatten(params))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        close_run(tracker, stage, status, parent, raise_on_error=status == "FINISHED")


def flush_timeout_s() -> float:
    return float(os.environ.get(FLUSH_TIMEOUT_ENV, DEFAULT_FLUSH_TIMEOUT_S))


def close_run(
    tracker: MlflowTracker, stage: str, status: str, parent: str, raise_on_error: bool
) -> None:
    """Send the buffered metrics and mark the runs ended. If MLflow stays unreachable, the
    metrics are saved to ``metrics/unsent-<run id>.json`` and the stage fails with a message
    saying so (its outputs, checkpoints included, are already on disk)."""
    pending = tracker.flush(raise_on_error=False, timeout_s=flush_timeout_s())
    saved = save_unsent(tracker) if pending else None
    try:
        tracker.client.set_terminated(tracker.run_id, status)
        tracker.client.set_terminated(parent, "FINISHED" if status == "FINISHED" else "FAILED")
    except Exception as exc:  # noqa: BLE001 - any transport error: report it clearly below
        problem = f"could not close MLflow run {tracker.run_id} at {tracking_uri()} ({exc})"
    else:
        if saved is None:
            return
        problem = f"MLflow run {tracker.run_id} at {tracking_uri()} did not take all metrics"
    message = (
        f"stage '{stage}': {problem}; its outputs are written. "
        + (f"{pending} unsent metrics were saved to {saved}. " if saved else "")
        + "Check that the MLflow server is up (MLFLOW_TRACKING_URI), then re-run the stage "
        "to record it"
    )
    if not raise_on_error:  # the stage already failed: do not hide its own error
        log.error(message)
        return
    raise ClipshiftError(message)


def save_unsent(tracker: MlflowTracker) -> Path:
    """Write the metrics MLflow never took to a JSON list (mlflow Metric dictionaries)."""
    path = Path("metrics") / f"unsent-{tracker.run_id}.json"
    write_json_atomic(path, tracker.unsent())
    log.error("MLflow unreachable: %d metrics saved to %s", len(tracker.unsent()), path)
    return path


@contextlib.contextmanager
def child_run(parent: MlflowTracker, name: str, tags: dict[str, str] | None = None):
    """A run nested under a stage run (e.g. one per trained model)."""
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    run = client.create_run(
        exp_id, run_name=name, tags={"mlflow.parentRunId": parent.run_id, **(tags or {})}
    )
    tracker = MlflowTracker(client, run.info.run_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        if tracker.flush(raise_on_error=False, timeout_s=flush_timeout_s()):
            save_unsent(tracker)
        client.set_terminated(run.info.run_id, status)


def run_url(run_id: str) -> str:
    """Where a person looks at this run (the server's UI, or `mlflow ui` on the local store)."""
    base = tracking_uri()
    if _is_local_store(base):
        base = "http://127.0.0.1:5000"
    client = mlflow_client()
    exp_id = client.get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists to dotted keys, the shape MLflow params and DVC params share."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, list):
        return {prefix.rstrip("."): json.dumps(obj)}
    return {prefix.rstrip("."): obj}


def dataset_digest(info: dict) -> str:
    """A dataset's content digest: of its shards' sha256s (a ``dataset.json``'s ``shards``)."""
    return hashlib.sha256("".join(s["sha256"] for s in info["shards"]).encode()).hexdigest()[:16]


def log_datasets(tracker: MlflowTracker, manifest: dict, data_dir: Path) -> None:
    """Record each dataset as an MLflow run input (name, content digest, source, profile)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for name, info in sorted(manifest["datasets"].items()):
        dataset = Dataset(
            name=name,
            digest=dataset_digest(info),
            source_type="local",
            source=json.dumps({"uri": str((Path(data_dir) / name).resolve())}),
            profile=json.dumps(
                {
                    "num_samples": info["num_samples"],
                    "role": info["role"],
                    "num_classes": len(info.get("classes") or []),
                }
            ),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", info["role"])]))
    tracker.client.log_inputs(tracker.run_id, datasets=inputs)


def register_classifier(
    tracker: MlflowTracker,
    checkpoint: str | Path,
    model_name: str,
    alias: str = "champion",
    tags: dict[str, str] | None = None,
) -> str:
    """Log a classifier checkpoint as a pyfunc model on the tracker's run, register it as a
    new version of ``model_name`` and point ``alias`` at that version; returns the version."""
    import mlflow

    from clipshift.serving import log_classifier  # imports mlflow.pyfunc: only when registering

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=tracker.run_id):
        info = log_classifier(checkpoint)
    version = mlflow.register_model(info.model_uri, model_name, tags=tags or {})
    tracker.client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)
