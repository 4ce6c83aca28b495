"""Every checkpoint the pipeline keeps, as an MLflow ``LoggedModel`` (MLflow 3's model API).

A stage logs the models it wrote in its own MLflow run, after it wrote them: a classifier as a
pyfunc model (images in, class probabilities out; see :mod:`clipshift.serving`), a pretrained
CLIP as its open_clip checkpoint plus architecture file. Each model carries its training facts
as params, and its parents as ``parent.<role>`` params holding their model ids: a zero-shot
head its pretrained CLIP, a fine-tune the zero-shot model it started from, a WiSE-FT point its
two endpoints and α, a soup its ingredients. Baselines and the supervised control have no
parent model; their ``data`` param names what they were trained on.

A model is known by its checkpoint's sha256 (tag :data:`SHA_TAG`). That is how a later stage
finds the model of a file it reads (evaluate links its metrics to it), and how a stage that DVC
re-runs with an unchanged output reuses the model it logged before instead of adding a twin.

Weights: every checkpoint carries them except the WiSE-FT points that are neither the α chosen
on val nor the paper's α = 0.5. Those are the weights ``(1 - α)·θ_zeroshot + α·θ_finetuned`` of
two logged models, rebuilt in seconds by the interpolate stage; storing all 22 points would
multiply the storage of a study by ~1.5 (and far more for large models) for nothing a user
would deploy.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipshift import tracking
from clipshift.checkpoints import sidecar_path
from clipshift.data.shards import sha256_file
from clipshift.errors import ClipshiftError, DataError
from clipshift.registry import INDEX_FILE, PRETRAINED_FILE, ModelEntry, read_index, read_indices

SHA_TAG = "clipshift.sha256"
PATH_TAG = "clipshift.path"
ID_TAG = "clipshift.model"  # the model's id in the stage's index (MLflow names take no '.')
WEIGHTS_TAG = "clipshift.weights"
CLASSIFIER = "classifier"  # a pyfunc model: images -> class probabilities
CLIP = "clip"  # an open_clip checkpoint and its architecture file


@dataclass(frozen=True)
class CheckpointModel:
    """A checkpoint file to log, with what MLflow should know about it."""

    name: str
    path: Path
    model_type: str
    params: dict[str, Any] = field(default_factory=dict)
    parents: dict[str, Path] = field(default_factory=dict)  # role -> the parent's checkpoint
    weights: bool = True
    extra_files: tuple[Path, ...] = ()  # logged beside the checkpoint (architecture json)


def checkpoint_sha256(path: str | Path) -> str:
    """The checkpoint's sha256: its sidecar (written with it), else computed."""
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return sidecar.read_text().split()[0]
    if not Path(path).is_file():
        raise DataError(f"checkpoint {path} is missing; re-run the stage that writes it")
    return sha256_file(path)


def mlflow_name(model_id: str) -> str:
    """A LoggedModel name for an index id: MLflow refuses '/', ':', '.', '%' and quotes."""
    return re.sub(r"[/:.%\"']", "_", model_id)


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def find_model_id(client: Any, experiment_id: str, sha256: str) -> str | None:
    """The newest READY model of this checkpoint in the experiment, if one was logged."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{SHA_TAG}` = '{sha256}'"
    )
    ready = [m for m in found if str(m.status).endswith("READY")]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


class ModelLogger:
    """Logs checkpoints as LoggedModels of one stage run; knows the experiment's models."""

    def __init__(self, tracker: tracking.MlflowTracker) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.experiment_id = self.client.get_run(tracker.run_id).info.experiment_id
        self._ids: dict[str, str] = {}  # sha256 -> model id
        self.created = 0

    def model_id(self, path: str | Path) -> str | None:
        sha = checkpoint_sha256(path)
        if sha not in self._ids:
            found = find_model_id(self.client, self.experiment_id, sha)
            if found is None:
                return None
            self._ids[sha] = found
        return self._ids[sha]

    def log(self, models: Iterable[CheckpointModel]) -> dict[str, str]:
        """Log each model (or reuse the one logged for the same file); name -> model id."""
        start, before = time.perf_counter(), self.created
        ids = {m.name: self._log_one(m) for m in models}
        created = self.created - before
        print(
            f"MLflow: {created} models logged, {len(ids) - created} reused "
            f"({time.perf_counter() - start:.1f} s)"
        )
        return ids

    def _log_one(self, model: CheckpointModel) -> str:
        sha = checkpoint_sha256(model.path)
        existing = self.model_id(model.path)
        if existing is not None:
            return existing
        params = {k: _param_text(v) for k, v in model.params.items() if v is not None}
        for role, parent in model.parents.items():
            parent_id = self.model_id(parent)
            # a parent logged nowhere (tracking was off when it was made) is named by its file
            params[f"parent.{role}"] = parent_id or f"file:{parent}@{checkpoint_sha256(parent)}"
        tags = {
            SHA_TAG: sha,
            PATH_TAG: str(model.path),
            ID_TAG: model.name,
            WEIGHTS_TAG: str(model.weights).lower(),
        }
        if model.model_type == CLASSIFIER and model.weights:
            model_id = self._log_classifier(model, params, tags)
        else:
            model_id = self._log_files(model, params, tags)
        self._ids[sha] = model_id
        self.created += 1
        return model_id

    def _log_classifier(self, model: CheckpointModel, params: dict, tags: dict) -> str:
        import mlflow

        from clipshift.serving import log_classifier

        mlflow.set_tracking_uri(tracking.tracking_uri())
        with mlflow.start_run(run_id=self.tracker.run_id):
            info = log_classifier(
                model.path,
                name=mlflow_name(model.name),
                params=params,
                tags=tags,
                model_type=CLASSIFIER,
            )
        return info.model_id

    def _log_files(self, model: CheckpointModel, params: dict, tags: dict) -> str:
        logged = self.client.create_logged_model(
            self.experiment_id,
            name=mlflow_name(model.name),
            source_run_id=self.tracker.run_id,
            params=params,
            tags=tags,
            model_type=model.model_type,
        )
        try:
            if model.weights:
                with tempfile.TemporaryDirectory() as folder:
                    for path in (model.path, *model.extra_files):
                        shutil.copy2(path, Path(folder) / Path(path).name)
                    self.client.log_model_artifacts(logged.model_id, folder)
        except Exception:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        return logged.model_id

    def log_metrics(
        self, path: str | Path, values: Mapping[tuple[str, str], float], digests: Mapping[str, str]
    ) -> int:
        """Queue ``{(metric, dataset): value}`` on the stage run, linked to the model of
        ``path`` and to each named dataset; returns how many were linked (0: no such model)."""
        from mlflow.entities import Metric

        model_id = self.model_id(path)
        if model_id is None:
            return 0
        # MLflow keys a model's metric by (name, timestamp, step), not by dataset: one
        # millisecond apart, "accuracy" on every dataset fits.
        now = int(time.time() * 1000)
        # MLflow takes a dataset only with its digest: a set without one stays unnamed
        metrics = [
            Metric(key, float(value), now + i, 0, model_id=model_id,
                   dataset_name=dataset if dataset in digests else None,
                   dataset_digest=digests.get(dataset))
            for i, ((key, dataset), value) in enumerate(values.items())
        ]  # fmt: skip
        self.tracker.queue_metrics(metrics)
        return len(metrics)


# --------------------------------------------------------------------------------------------
# what the stages wrote, as CheckpointModels


def dataset_digests(data_dir: str | Path) -> dict[str, str]:
    """``{dataset name: digest}`` of the webdataset sets in ``data_dir`` (as fetch logs them)."""
    digests = {}
    for info_file in sorted(Path(data_dir).glob("*/dataset.json")):
        info = json.loads(info_file.read_text())
        digests[info_file.parent.name] = tracking.dataset_digest(info)
    return digests


def _scalar_facts(extra: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if isinstance(v, str | int | float | bool)}


def entry_parents(
    entry: ModelEntry, by_id: Mapping[str, ModelEntry], pretrain_dir: str | Path
) -> dict[str, Path]:
    """The checkpoints a model was made from (see the module docstring)."""

    def path_of(model_id: str) -> Path:
        if model_id not in by_id:
            raise DataError(f"model '{entry.id}' names '{model_id}', which no index lists")
        return Path(by_id[model_id].path)

    pretrained = Path(pretrain_dir) / str(entry.pool) / PRETRAINED_FILE
    if entry.kind == "zeroshot":
        return {"pretrained": Path(entry.extra.get("pretrained") or pretrained)}
    if entry.kind in ("linear", "knn"):
        return {"pretrained": pretrained}
    if entry.kind == "finetuned":  # starts from the zero-shot model (tower + zero-shot head)
        return {"zeroshot": path_of(f"zeroshot-{entry.pool}")}
    if entry.kind == "wiseft":
        return {
            "zeroshot": path_of(f"zeroshot-{entry.pool}"),
            "finetuned": path_of(entry.extra["finetuned"]),
        }
    if entry.kind == "soup":
        return {f"ingredient.{i}": path_of(m) for i, m in enumerate(entry.extra["members"])}
    return {}  # baseline, supervised: trained from scratch


def carries_weights(entry: ModelEntry) -> bool:
    """WiSE-FT points carry weights only where a user would deploy them."""
    if entry.kind != "wiseft":
        return True
    return bool(entry.extra.get("chosen") or entry.extra.get("paper_alpha"))


def entry_model(
    entry: ModelEntry, by_id: Mapping[str, ModelEntry], pretrain_dir: str | Path
) -> CheckpointModel:
    data = {"baseline": "reference train split", "supervised": f"pool {entry.pool}"}
    params = {
        "kind": entry.kind,
        "pool": entry.pool,
        "alpha": entry.wise_alpha,
        "data": data.get(entry.kind),
        **_scalar_facts(entry.extra),
    }
    return CheckpointModel(
        name=entry.id,
        path=Path(entry.path),
        model_type=CLASSIFIER,
        params=params,
        parents=entry_parents(entry, by_id, pretrain_dir),
        weights=carries_weights(entry),
    )


def clip_model(
    name: str, checkpoint: Path, architecture: str, params: Mapping[str, Any]
) -> CheckpointModel:
    """A pretrained CLIP: the checkpoint and the ``<architecture>.json`` beside it, which
    ``open_clip.add_model_config`` registers (so stock open_clip loads the pair)."""
    config = checkpoint.with_name(f"{architecture}.json")
    if not config.is_file():
        raise DataError(f"{checkpoint} has no architecture file {config}; re-run its stage")
    return CheckpointModel(
        name=name,
        path=checkpoint,
        model_type=CLIP,
        params={"architecture": architecture, **params},
        extra_files=(config,),
    )


# parents before children, so each child finds its parents' model ids
KIND_ORDER = ("zeroshot", "linear", "knn", "baseline", "supervised", "finetuned", "wiseft", "soup")


def stage_entries(stage_dir: str | Path) -> list[ModelEntry]:
    """The models a stage's index lists (``<stage_dir>/index.json``), parents first."""
    entries = read_index(Path(stage_dir) / INDEX_FILE)
    return sorted(entries, key=lambda e: KIND_ORDER.index(e.kind))


def log_index(
    tracker: tracking.MlflowTracker,
    stage_dir: str | Path,
    models_dir: str | Path,
    pretrain_dir: str | Path,
) -> dict[str, str]:
    """Log every model of the stage's index, with its lineage; ``{model id: LoggedModel id}``.
    ``models_dir``: where the other stages' indices are (to find parents)."""
    by_id = {e.id: e for e in read_indices(models_dir)}
    entries = stage_entries(stage_dir)
    by_id.update({e.id: e for e in entries})
    return ModelLogger(tracker).log(entry_model(e, by_id, pretrain_dir) for e in entries)


def evaluation_metrics(record: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """An evaluate record as ``{(metric, dataset): value}``: accuracy on every set, effective
    robustness on every shift."""
    values = {("accuracy", ds): acc for ds, acc in record.get("accuracy", {}).items()}
    for shift, er in (record.get("effective_robustness") or {}).items():
        values[("effective_robustness", shift)] = er
    return values


def retrieval_metrics(recall: Mapping[str, float], dataset: str) -> dict[tuple[str, str], float]:
    """``image_to_text@5`` -> ``image_to_text_recall_at_5`` (MLflow keys take no '@')."""
    return {(k.replace("@", "_recall_at_"), dataset): v for k, v in recall.items()}


def scaling_metrics(row: Mapping[str, Any], id_dataset: str, retrieval: str) -> dict:
    """A scaling row as ``{(metric, dataset): value}``."""
    values = {
        ("zeroshot_accuracy", id_dataset): row.get("zeroshot_accuracy"),
        ("linear_probe_accuracy", id_dataset): row.get("linear_probe_accuracy"),
        ("retrieval_recall_at_1", retrieval): row.get("retrieval_recall_1"),
        ("retrieval_recall_at_5", retrieval): row.get("retrieval_recall_5"),
    }
    for shift, acc in (row.get("zeroshot_shift_accuracy") or {}).items():
        values[("zeroshot_accuracy", shift)] = acc
    for shift, er in (row.get("effective_robustness") or {}).items():
        values[("effective_robustness", shift)] = er
    return {k: v for k, v in values.items() if v is not None}


def link_evaluation(
    tracker: tracking.MlflowTracker,
    summary: Mapping[str, Any],
    models_dir: str | Path,
    data_dir: str | Path,
) -> int:
    """Link evaluate's numbers to the models they are of (and to their datasets): each
    indexed model's accuracies and ER, each pretrained CLIP's retrieval recalls."""
    logger, digests = ModelLogger(tracker), dataset_digests(data_dir)
    linked = 0
    for entry in read_indices(models_dir):
        if entry.id in summary.get("models", {}):
            values = evaluation_metrics(summary["models"][entry.id])
            linked += logger.log_metrics(entry.path, values, digests)
    for pool, recall in (summary.get("retrieval") or {}).items():
        checkpoint = Path(models_dir) / "pretrain" / pool / PRETRAINED_FILE
        if checkpoint.is_file():
            linked += logger.log_metrics(
                checkpoint, retrieval_metrics(recall, "retrieval"), digests
            )
    return linked


# --------------------------------------------------------------------------------------------
# promotion


def promote(
    model_id: str,
    registered_model: str,
    alias: str = "champion",
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register a LoggedModel as a new version of ``registered_model`` and point ``alias`` at
    it (moving the alias if it pointed elsewhere); returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    try:
        logged = client.get_logged_model(model_id)
    except Exception as exc:  # noqa: BLE001 - MLflow's own error says why; name the fix
        raise ClipshiftError(
            f"no logged model '{model_id}' at {tracking.tracking_uri()} ({exc}); "
            "list them with mlflow.search_logged_models() or in the MLflow UI's Models tab"
        ) from None
    if logged.tags.get(WEIGHTS_TAG) == "false":
        raise ClipshiftError(
            f"model {model_id} ({logged.name}) carries no weights (a WiSE-FT point rebuilt from "
            "its endpoints); promote the chosen point or α = 0.5, or re-run interpolate"
        )
    version = mlflow.register_model(f"models:/{model_id}", registered_model, tags=dict(tags or {}))
    client.set_registered_model_alias(registered_model, alias, version.version)
    return str(version.version)
