"""Where a study's results came from: the git commit, the DVC hashes of every stage's outputs,
and the MLflow runs (with their Prefect flow-run ids) of the pipeline that made them.

The study report prints this beside the findings, so that a reader of the page can trace any
number back to the exact code, data and runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from clipshift import tracking

FLOW_RUN_TAG = "prefect.flow_run_id"  # set on every stage run by flows/_common.tracked_stage


@dataclass(frozen=True)
class Output:
    path: str
    md5: str  # DVC's hash; a directory's ends in ".dir"
    files: int | None = None  # a directory's file count


@dataclass(frozen=True)
class RunRef:
    """One MLflow run: a stage's child run or the pipeline's parent run."""

    name: str
    run_id: str
    status: str
    stage: str
    flow_run_id: str
    url: str | None  # the tracking UI's page of the run; None on a local store (no UI)


@dataclass(frozen=True)
class Lineage:
    commit: str
    dirty: bool
    changes: list[str]  # `git status --porcelain` lines of the changed tracked sources
    outputs: dict[str, list[Output]]  # DVC stage → its outputs, as dvc.lock records them
    tracking_uri: str
    parent: RunRef | None = None
    runs: list[RunRef] = field(default_factory=list)  # the pipeline's stage runs, oldest first
    rewritten: int = 0  # committed pipeline outputs (dvc.lock outs) this run's stages rewrote


def dvc_outputs(
    lock: str | Path = "dvc.lock", spec: str | Path = "dvc.yaml", running: str | None = None
) -> dict[str, list[Output]]:
    """Each stage's outputs with their hashes as ``lock`` records them, in ``spec``'s order.

    Only stages that ``spec`` defines as they are named are kept: DVC leaves the entries of a
    stage that became, or stopped being, a matrix stage in the lock. The ``running`` stage is
    left out too: DVC records its outputs only once it has finished.
    """
    lock_path, spec_path = Path(lock), Path(spec)
    if not lock_path.is_file() or not spec_path.is_file():
        return {}
    stages = list(yaml.safe_load(spec_path.read_text()).get("stages", {}).items())
    order = {name: i for i, (name, _) in enumerate(stages)}
    entries = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    outputs = {}
    for name in sorted(entries, key=lambda n: (order.get(n.split("@", 1)[0], len(order)), n)):
        base, matrix = name.split("@", 1)[0], "@" in name
        if base not in order or base == running:
            continue
        defined = stages[order[base]][1]
        if matrix != ("matrix" in defined or "foreach" in defined):
            continue
        outputs[name] = [
            Output(o["path"], str(o.get("md5", "unknown")), o.get("nfiles"))
            for o in entries[name].get("outs", [])
        ]
    return outputs


def public_uri(uri: str) -> str:
    """``uri`` without a user name or password (a server URI may carry them)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _run_ref(run: Any, uri: str) -> RunRef:
    tags = run.data.tags
    return RunRef(
        name=run.info.run_name or run.info.run_id,
        run_id=run.info.run_id,
        status=run.info.status,
        stage=tags.get("clipshift.stage", ""),
        flow_run_id=tags.get(FLOW_RUN_TAG, ""),
        url=_run_url(uri, run.info.experiment_id, run.info.run_id),
    )


def pipeline_runs(client: Any, run_id: str, uri: str) -> tuple[RunRef | None, list[RunRef]]:
    """The parent (pipeline) run of stage run ``run_id`` and its stage runs, oldest first.
    A stage re-run under the same parent (same commit and params) appears once, as its latest
    run: the one whose outputs are on disk."""
    own = client.get_run(run_id)
    parent_id = own.data.tags.get("mlflow.parentRunId")
    if not parent_id:
        return None, [_run_ref(own, uri)]
    children = client.search_runs(
        [own.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        max_results=1000,
    )
    latest: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: (r.info.start_time, r.info.run_id)):
        latest[run.info.run_name or run.info.run_id] = run  # later runs replace earlier ones
    ordered = sorted(latest.values(), key=lambda r: (r.info.start_time, r.info.run_id))
    return _run_ref(client.get_run(parent_id), uri), [_run_ref(r, uri) for r in ordered]


def collect_lineage(
    tracker: tracking.MlflowTracker | None = None, stage: str | None = None
) -> Lineage:
    """The lineage of the working tree (run from the repository root, as DVC runs stages) and,
    given the running ``stage``'s tracker, of the pipeline run it belongs to."""
    state, uri = tracking.git_state(), public_uri(tracking.tracking_uri())
    parent: RunRef | None = None
    runs: list[RunRef] = []
    if tracker is not None:
        parent, runs = pipeline_runs(tracker.client, tracker.run_id, uri)
    return Lineage(
        commit=state["git.commit"],
        dirty=state["git.dirty"] == "true",
        changes=tracking.git_changes(),
        rewritten=len(tracking.git_changes(outputs=True)) - len(tracking.git_changes()),
        outputs=dvc_outputs(running=stage),
        tracking_uri=uri,
        parent=parent,
        runs=runs,
    )
