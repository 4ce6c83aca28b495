"""The small logging interface the library computes against.

Library code never imports mlflow: it receives a :class:`Tracker` and logs through it. The flows
pass an MLflow-backed tracker (``clipshift.tracking``); tests and plain-Python callers pass
:class:`NullTracker` or a recording one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: dict[str, Any], name: str) -> None: ...

    def child(self, name: str, tags: dict[str, str]) -> contextlib.AbstractContextManager:
        """A tracker for a nested unit of work (an MLflow child run per trained model)."""
        ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        pass

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, str]) -> Iterator[Tracker]:
        yield NullTracker()  # nothing is logged per nested unit without a run store


class RecordingTracker(NullTracker):
    """Keeps what was logged in memory; for tests and for the final summary of a stage."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.dicts: dict[str, dict[str, Any]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        self.dicts[name] = obj

    def dump(self) -> dict[str, Any]:
        """What was logged, as JSON values (for :func:`replay` in another process)."""
        return {
            "metrics": [[step, metrics] for step, metrics in self.metrics],
            "params": dict(self.params),
            "tags": dict(self.tags),
            "artifacts": [list(a) for a in self.artifacts],
            "dicts": dict(self.dicts),
        }


def replay(recorded: dict[str, Any], tracker: Tracker) -> None:
    """Log into ``tracker`` what a :class:`RecordingTracker` recorded (its :meth:`dump`): how a
    stage run on torchrun ranks reaches the flow's MLflow run, as if it had run in-process."""
    if recorded["params"]:
        tracker.log_params(recorded["params"])
    if recorded["tags"]:
        tracker.set_tags(recorded["tags"])
    for step, metrics in recorded["metrics"]:
        tracker.log_metrics(metrics, step=step)
    for name, obj in recorded["dicts"].items():
        tracker.log_dict(obj, name)
    for path, artifact_path in recorded["artifacts"]:
        tracker.log_artifact(path, artifact_path)
