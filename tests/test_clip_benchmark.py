"""Evaluate's CLIP_benchmark result files, read back the way CLIP_benchmark merges results.

CLIP_benchmark's ``build`` command globs its JSON result files and turns each into a CSV row:
the ``metrics`` flattened beside ``dataset``, ``model``, ``pretrained``, ``task`` and
``language``, plus ``model_fullname`` (``model + ' ' + pretrained``). :func:`merge_rows` does
the same here. The metrics are checked against CLIP_benchmark's own definitions computed by
hand on the model's logits: top-5 over the scored classes, scikit-learn's balanced accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from clipshift.classifier import predict_logits, save_classifier
from clipshift.config import EvaluateConfig, FetchConfig
from clipshift.data.loaders import load_labelled
from clipshift.data.shards import load_info
from clipshift.errors import DataError
from clipshift.methods import clip_benchmark as cb
from clipshift.registry import ModelEntry, write_index
from clipshift.stages.evaluate import class_mask, run_evaluate
from clipshift.stages.fetch import run_fetch
from tests.test_finetune import tiny_bundle, zs_classifier
from tests.test_imagenet_names import source, wnid_tree

VAL = [0, 1, 2, 3, 4, 657, 744]  # 7 classes: top-5 is not trivial
R_SUBSET = [1, 744]  # 2 classes scored: no top-5 (CLIP_benchmark's NaN)
KEYS = {"dataset", "model", "pretrained", "task", "language", "model_fullname"}


def merge_rows(folder: Path) -> list[dict]:
    """CLIP_benchmark's ``build``: every result JSON as one flat row."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        row = dict(data["metrics"])
        row.update(data)
        del row["metrics"]
        row["model_fullname"] = row["model"] + " " + row["pretrained"]
        rows.append(row)
    return rows


def write_models(models: Path, classes: list[str]):
    """A tiny CLIP's zero-shot head, indexed as zero-shot and (the same weights) fine-tuned."""
    bundle = tiny_bundle()
    clf = zs_classifier(bundle, classes)
    meta = {"model_config": bundle.config, "model_name": bundle.name, "classnames": classes}
    for kind in ("zeroshot", "finetuned"):
        save_classifier(models / kind / "m.pt", clf, {**meta, "kind": kind})
        write_index(models / kind, [ModelEntry(id=f"{kind}-tiny", kind=kind, path="m.pt")])
    return bundle, clf


def hand_metrics(clf, dataset: Path) -> dict[str, float | None]:
    """CLIP_benchmark's zero-shot metrics on masked logits."""
    data = load_labelled(dataset)
    logits = predict_logits(clf, data.images)
    mask = class_mask(load_info(dataset))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    pred = logits.argmax(dim=1)
    scored = logits.shape[1] if mask is None else int(mask.sum())
    top5 = logits.topk(5, dim=1).indices if scored >= 5 else None
    return {
        "acc1": float((pred == data.labels).float().mean()),
        "acc5": None
        if top5 is None
        else float((top5 == data.labels[:, None]).any(1).float().mean()),
        "mean_per_class_recall": float(balanced_accuracy_score(data.labels, pred)),
    }


def test_evaluate_writes_results_clip_benchmark_merges(tmp_path):
    fetch = FetchConfig(
        use_world=False,
        out_dir=str(tmp_path / "data" / "fetch"),
        cache_dir=str(tmp_path / "cache"),
        sources=[
            source("imagenet-val", wnid_tree(tmp_path / "val", VAL), "test"),
            source("imagenet-r", wnid_tree(tmp_path / "r", R_SUBSET), "shift"),
        ],
    )
    classes = run_fetch(fetch, progress=False)["task"]["classes"]
    bundle, clf = write_models(tmp_path / "models", classes)
    (tmp_path / "testbed.csv").write_text("model,id,imagenet-r\na,0.5,0.2\nb,0.6,0.3\nc,0.7,0.4\n")
    cfg = EvaluateConfig(
        data_dir=fetch.out_dir,
        models_dir=str(tmp_path / "models"),
        validate_dir=str(tmp_path / "data" / "validate"),
        out_dir=str(tmp_path / "data" / "evaluate"),
        metrics_path=str(tmp_path / "metrics" / "evaluate.json"),
        plots_dir=str(tmp_path / "plots"),
        external_baselines=str(tmp_path / "testbed.csv"),
        external_mode="replace",
        register_model=False,
        bootstrap=20,
    )
    (tmp_path / "data" / "evaluate" / cb.SUBDIR).mkdir(parents=True)
    (tmp_path / "data" / "evaluate" / cb.SUBDIR / "stale.json").write_text("{}")
    summary = run_evaluate(cfg, progress=False)

    rows = merge_rows(tmp_path / "data" / "evaluate" / cb.SUBDIR)  # stale.json is gone
    got = {(r["pretrained"], r["dataset"]): r for r in rows}
    assert set(got) == {
        (m, d) for m in ("zeroshot-tiny", "finetuned-tiny") for d in ("imagenet-val", "imagenet-r")
    }
    for (model, dataset), row in got.items():
        assert set(row) == KEYS | set(cb.CLASSIFICATION_METRICS)
        assert row["model"] == bundle.name and row["language"] == "en"
        assert row["model_fullname"] == f"{bundle.name} {model}"
        assert row["task"] == (
            "zeroshot_classification" if model.startswith("zero") else "classification"
        )
        assert row["acc1"] == summary["models"][model]["accuracy"][dataset]
        expected = hand_metrics(clf, tmp_path / "data" / "fetch" / dataset)
        assert row["acc1"] == pytest.approx(expected["acc1"])
        assert row["mean_per_class_recall"] == pytest.approx(expected["mean_per_class_recall"])
        if dataset == "imagenet-r":
            assert row["acc5"] is None  # 2 classes scored
        else:
            assert row["acc5"] == pytest.approx(expected["acc5"]) and row["acc5"] >= row["acc1"]
    with (tmp_path / "benchmark.csv").open("w", newline="") as fh:  # build's CSV step
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    assert len((tmp_path / "benchmark.csv").read_text().splitlines()) == 1 + len(rows)


def test_retrieval_results_use_clip_benchmark_names(tmp_path):
    recalls = {
        "diverse": {
            "image_to_text@1": 0.25,
            "text_to_image@1": 0.5,
            "image_to_text@5": 0.75,
            "text_to_image@5": 1.0,
        }
    }
    (res,) = cb.retrieval_results(recalls, {"diverse": "ViT-B-32"}, "retrieval")
    assert res.task == "zeroshot_retrieval" and res.pretrained == "pretrain-diverse"
    # CLIP_benchmark's image retrieval ranks images for each text: clipshift's text→image
    assert res.metrics == {
        "image_retrieval_recall@1": 0.5,
        "text_retrieval_recall@1": 0.25,
        "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@5": 0.75,
    }
    (path,) = cb.write_results(tmp_path, [res])
    assert path.name == "retrieval_pretrain-diverse_ViT-B-32_en_zeroshot_retrieval.json"
    (row,) = merge_rows(tmp_path)
    assert row["model_fullname"] == "ViT-B-32 pretrain-diverse"
    hf = cb.Result("imagenet-val", "hf-hub:org/name", "zs", "zeroshot_classification", {})
    assert hf.file_name() == "imagenet-val_zs_hf-hub-org-name_en_zeroshot_classification.json"
    with pytest.raises(DataError, match="collide"):
        cb.write_results(tmp_path, [res, res])


def test_mean_per_class_recall_is_balanced_accuracy():
    from clipshift.methods.bootstrap import from_predictions

    labels = np.array([0, 0, 0, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    counts = from_predictions({"m": {"d": pred}}, {"d": labels}, num_classes=4)  # class 3 absent
    assert cb.mean_per_class_recall(counts, "m", "d") == pytest.approx(
        balanced_accuracy_score(labels, pred)
    )
