"""Every checkpoint an MLflow LoggedModel (clipshift.logged_models), on a real MLflow store:
lineage between models, reuse of a model already logged for the same file, weights only where
a user would deploy them, metrics linked to a model and a dataset, promotion with an alias."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch

from clipshift import logged_models as LM
from clipshift import tracking
from clipshift.checkpoints import save_checkpoint, sidecar_path
from clipshift.classifier import ImageClassifier, build_visual, make_head, save_classifier
from clipshift.cli import main as cli_main
from clipshift.errors import ClipshiftError
from clipshift.models import tiny_vit_config
from clipshift.registry import PRETRAINED_FILE, ModelEntry, read_indices, write_index

CLASSES = ["apple", "dog", "car"]
ARCH = "clipshift-vit-test"


def _classifier(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = tiny_vit_config(32, 1, image_size=16, patch_size=8)
    clf = ImageClassifier(build_visual(config), make_head(torch.randn(len(CLASSES), 32)))
    return save_classifier(path, clf, {"model_config": config, "classnames": CLASSES})


def _entry(id_: str, kind: str, path: str, **fields: Any) -> ModelEntry:
    return ModelEntry(id=id_, kind=kind, path=path, **fields)


@pytest.fixture
def study(mlflow_store, tmp_path) -> Path:
    return build_study(tmp_path)


def build_study(root: Path) -> Path:
    """A models/ tree as the stages leave it: a pretrained CLIP, finetune's zero-shot model,
    fine-tune and baseline, interpolate's WiSE-FT points and soup."""
    models = root / "models"
    clip = models / "pretrain" / "diverse" / PRETRAINED_FILE
    clip.parent.mkdir(parents=True)
    save_checkpoint(clip, {"state_dict": {"w": torch.ones(2)}})
    clip.with_name(f"{ARCH}.json").write_text(json.dumps({"embed_dim": 32}))
    finetune, interpolate = models / "finetune", models / "interpolate"
    for i, name in enumerate(["zeroshot-diverse", "finetuned-diverse-0", "baseline-00"]):
        _classifier(finetune / f"{name}.pt", i)
    write_index(finetune, [
        _entry("zeroshot-diverse", "zeroshot", "zeroshot-diverse.pt", pool="diverse",
               extra={"pretrained": str(clip)}),
        _entry("finetuned-diverse-0", "finetuned", "finetuned-diverse-0.pt", pool="diverse",
               extra={"lr": 4e-4, "epochs": 8}),
        _entry("baseline-00", "baseline", "baseline-00.pt", extra={"width": 64}),
    ])  # fmt: skip
    for i, name in enumerate(["wiseft-diverse-a0.3", "wiseft-diverse-a0.5", "soup-uniform"]):
        _classifier(interpolate / f"{name}.pt", 10 + i)
    point = {"finetuned": "finetuned-diverse-0", "variant": "end-to-end"}
    write_index(interpolate, [
        _entry("wiseft-diverse-a0.3", "wiseft", "wiseft-diverse-a0.3.pt", pool="diverse",
               wise_alpha=0.3, extra={**point, "chosen": False, "paper_alpha": False}),
        _entry("wiseft-diverse-a0.5", "wiseft", "wiseft-diverse-a0.5.pt", pool="diverse",
               wise_alpha=0.5, extra={**point, "chosen": True, "paper_alpha": True}),
        _entry("soup-uniform", "soup", "soup-uniform.pt", pool="diverse",
               extra={"members": ["finetuned-diverse-0", "zeroshot-diverse"]}),
    ])  # fmt: skip
    return models


def log_study(models: Path) -> None:
    """What the pretrain, finetune and interpolate flows do, each in its own stage run."""
    clip = models / "pretrain" / "diverse" / PRETRAINED_FILE
    with tracking.stage_run("pretrain") as tracker:
        LM.ModelLogger(tracker).log([LM.clip_model("pretrain-diverse", clip, ARCH, {"seed": 0})])
    with tracking.stage_run("finetune") as tracker:
        LM.log_index(tracker, models / "finetune", models, models / "pretrain")
    with tracking.stage_run("interpolate") as tracker:
        LM.log_index(tracker, models / "interpolate", models, models / "pretrain")


def logged_by_sha(uri: str) -> dict[str, Any]:
    """sha256 tag -> LoggedModel, over every experiment of the store."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return {m.tags[LM.SHA_TAG]: m for m in client.search_logged_models(exp_ids)}


def model_of(path: Path, uri: str) -> Any:
    return logged_by_sha(uri)[sidecar_path(path).read_text().split()[0]]


def test_every_checkpoint_is_a_model_naming_its_parents(study, mlflow_store):
    log_study(study)
    m = {name: model_of(p, mlflow_store) for name, p in {
        "clip": study / "pretrain/diverse/checkpoint.pt",
        "zs": study / "finetune/zeroshot-diverse.pt",
        "ft": study / "finetune/finetuned-diverse-0.pt",
        "base": study / "finetune/baseline-00.pt",
        "a03": study / "interpolate/wiseft-diverse-a0.3.pt",
        "a05": study / "interpolate/wiseft-diverse-a0.5.pt",
        "soup": study / "interpolate/soup-uniform.pt",
    }.items()}  # fmt: skip
    assert len(logged_by_sha(mlflow_store)) == 7
    assert m["clip"].model_type == LM.CLIP and m["zs"].model_type == LM.CLASSIFIER
    assert m["zs"].params["parent.pretrained"] == m["clip"].model_id
    assert m["ft"].params["parent.zeroshot"] == m["zs"].model_id  # starts from the zero-shot head
    assert m["ft"].params["lr"] == "0.0004" and m["ft"].params["kind"] == "finetuned"
    assert not any(k.startswith("parent.") for k in m["base"].params)
    assert m["base"].params["data"] == "reference train split"
    for point in ("a03", "a05"):
        assert m[point].params["parent.zeroshot"] == m["zs"].model_id
        assert m[point].params["parent.finetuned"] == m["ft"].model_id
    assert m["a03"].params["alpha"] == "0.3"
    soup = m["soup"].params
    assert [soup["parent.ingredient.0"], soup["parent.ingredient.1"]] == [
        m["ft"].model_id,
        m["zs"].model_id,
    ]
    # each model belongs to the run of the stage that made it
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    stage_of = {k: client.get_run(v.source_run_id).info.run_name for k, v in m.items()}
    assert stage_of == {"clip": "pretrain", "zs": "finetune", "ft": "finetune",
                        "base": "finetune", "a03": "interpolate", "a05": "interpolate",
                        "soup": "interpolate"}  # fmt: skip


def test_weights_only_where_a_user_would_deploy(study, mlflow_store):
    log_study(study)
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)

    def files(path: Path) -> set[str]:
        model = model_of(path, mlflow_store)
        return {Path(a.path).name for a in client.list_logged_model_artifacts(model.model_id)}

    assert files(study / "interpolate/wiseft-diverse-a0.3.pt") == set()
    assert (
        model_of(study / "interpolate/wiseft-diverse-a0.3.pt", mlflow_store).tags[LM.WEIGHTS_TAG]
        == "false"
    )
    assert "MLmodel" in files(study / "interpolate/wiseft-diverse-a0.5.pt")
    assert files(study / "pretrain/diverse/checkpoint.pt") == {"checkpoint.pt", f"{ARCH}.json"}


def test_a_rerun_reuses_models_and_a_new_file_gets_a_new_one(study, mlflow_store, capsys):
    log_study(study)
    before = logged_by_sha(mlflow_store)
    capsys.readouterr()
    log_study(study)  # DVC re-ran the stages and they wrote the same files
    assert logged_by_sha(mlflow_store).keys() == before.keys()
    assert "MLflow: 0 models logged, 3 reused" in capsys.readouterr().out  # interpolate's
    _classifier(study / "finetune/baseline-00.pt", 99)  # retrained: new bytes
    with tracking.stage_run("finetune") as tracker:
        LM.log_index(tracker, study / "finetune", study, study / "pretrain")
    after = logged_by_sha(mlflow_store)
    assert len(after) == len(before) + 1


def _dataset(folder: Path, sha: str) -> None:
    folder.mkdir(parents=True)
    info = {"name": folder.name, "shards": [{"file": "a.tar", "sha256": sha}]}
    (folder / "dataset.json").write_text(json.dumps(info))


def test_evaluate_links_metrics_to_model_and_dataset(study, mlflow_store, tmp_path):
    log_study(study)
    data = tmp_path / "data"
    for name, sha in [("test", "aa"), ("shift-x", "bb"), ("retrieval", "cc")]:
        _dataset(data / name, sha)
    digests = LM.dataset_digests(data)
    summary = {
        "models": {
            e.id: {"accuracy": {"test": 0.5, "shift-x": 0.25},
                   "effective_robustness": {"shift-x": 0.03}}
            for e in read_indices(study)
        },
        "retrieval": {"diverse": {"image_to_text@5": 0.4}},
    }  # fmt: skip
    with tracking.stage_run("evaluate") as tracker:
        linked = LM.link_evaluation(tracker, summary, study, data)
    assert linked == 6 * 3 + 1
    model = mlflow.MlflowClient(tracking_uri=mlflow_store).get_logged_model(
        model_of(study / "finetune/finetuned-diverse-0.pt", mlflow_store).model_id
    )
    got = {(x.key, x.dataset_name, x.dataset_digest): x.value for x in model.metrics}
    assert got == {
        ("accuracy", "test", digests["test"]): 0.5,
        ("accuracy", "shift-x", digests["shift-x"]): 0.25,
        ("effective_robustness", "shift-x", digests["shift-x"]): 0.03,
    }
    clip = mlflow.MlflowClient(tracking_uri=mlflow_store).get_logged_model(
        model_of(study / "pretrain/diverse/checkpoint.pt", mlflow_store).model_id
    )
    assert [(x.key, x.dataset_name) for x in clip.metrics] == [
        ("image_to_text_recall_at_5", "retrieval")
    ]


def test_promote_registers_a_model_and_moves_the_alias(study, mlflow_store, capsys):
    log_study(study)
    point = model_of(study / "interpolate/wiseft-diverse-a0.5.pt", mlflow_store)
    soup = model_of(study / "interpolate/soup-uniform.pt", mlflow_store)
    assert LM.promote(point.model_id, "clipshift-test") == "1"
    loaded = mlflow.pyfunc.load_model("models:/clipshift-test@champion")
    images = np.random.default_rng(0).integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
    assert list(loaded.predict(images).columns) == CLASSES
    # the CLI moves the alias to another model
    assert cli_main(["promote", soup.model_id, "--name", "clipshift-test"]) == 0
    assert "clipshift-test v2 @champion" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    version = client.get_model_version_by_alias("clipshift-test", "champion")
    assert str(version.version) == "2" and version.source == f"models:/{soup.model_id}"
    weightless = model_of(study / "interpolate/wiseft-diverse-a0.3.pt", mlflow_store)
    with pytest.raises(ClipshiftError, match="carries no weights"):
        LM.promote(weightless.model_id, "clipshift-test")
    assert cli_main(["promote", "m-nosuchmodel", "--name", "clipshift-test"]) == 2
    assert "no logged model 'm-nosuchmodel'" in capsys.readouterr().err


def test_parents_of_each_kind(tmp_path):
    by_id = {
        "zeroshot-p": _entry("zeroshot-p", "zeroshot", "z.pt", pool="p"),
        "ft": _entry("ft", "finetuned", "f.pt", pool="p"),
    }
    pre = tmp_path / "pre"

    def parents(entry: ModelEntry) -> dict[str, Path]:
        return LM.entry_parents(entry, by_id, pre)

    assert parents(_entry("lin", "linear", "l.pt", pool="p")) == {
        "pretrained": pre / "p" / PRETRAINED_FILE
    }
    assert parents(_entry("k", "knn", "k.pt", pool="p"))["pretrained"].parent.name == "p"
    assert parents(by_id["ft"]) == {"zeroshot": Path("z.pt")}
    assert parents(_entry("s", "supervised", "s.pt", pool="p")) == {}
    with pytest.raises(ClipshiftError, match="names 'gone'"):
        parents(_entry("w", "wiseft", "w.pt", pool="p", wise_alpha=0.2,
                       extra={"finetuned": "gone"}))  # fmt: skip


def assert_every_checkpoint_is_a_model(repo: Path, uri: str) -> int:
    """After a whole study: each checkpoint under models/ (resume state aside) is a LoggedModel
    with a metric linked to a named dataset; fine-tunes, WiSE-FT points and soups name their
    parents' model ids. Returns how many checkpoints there were."""
    logged = logged_by_sha(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    checkpoints = [p for p in (repo / "models").rglob("*.pt") if "resume" not in p.parts]
    for path in checkpoints:
        sha = sidecar_path(path).read_text().split()[0]
        assert sha in logged, f"{path} is not a logged model"
        model = client.get_logged_model(logged[sha].model_id)
        assert any(m.dataset_name for m in model.metrics), f"{path}: no metric on a dataset"
        if model.params.get("kind") in ("finetuned", "wiseft", "soup"):
            parents = [v for k, v in model.params.items() if k.startswith("parent.")]
            assert parents and all(v in {m.model_id for m in logged.values()} for v in parents)
    return len(checkpoints)
