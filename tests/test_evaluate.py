"""Accuracy, feature caching, retrieval recall, the models index, and the three stages end to end
(finetune → interpolate → evaluate) on a tiny on-disk world."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from PIL import Image

from clipshift.checkpoints import save_open_clip_checkpoint
from clipshift.classifier import ImageClassifier, make_head, save_classifier
from clipshift.config import (
    BaselineSpec,
    EvaluateConfig,
    FinetuneConfig,
    InterpolateConfig,
    SoupIngredient,
)
from clipshift.data.shards import DatasetInfo, ShardWriter
from clipshift.errors import DataError
from clipshift.methods.bootstrap import read_counts
from clipshift.methods.clip_eval import retrieval_recall
from clipshift.methods.knn import knn_predict, save_knn
from clipshift.methods.metrics import accuracy, recall_at_k
from clipshift.registry import ModelEntry, read_indices, write_index
from clipshift.stages import evaluate as ev
from clipshift.stages.evaluate import evaluate_models
from clipshift.stages.finetune import run_finetune
from clipshift.stages.interpolate import run_interpolate
from tests.test_finetune import CLASSES, tiny_bundle, toy_data, zs_classifier

# --------------------------------------------------------------------------------------------
# retrieval


def test_recall_on_identical_embeddings_is_one():
    emb = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    out = recall_at_k(emb, emb.clone(), ks=(1, 5))
    assert out == {
        "image_to_text@1": 1.0,
        "text_to_image@1": 1.0,
        "image_to_text@5": 1.0,
        "text_to_image@5": 1.0,
    }


def test_recall_counts_only_true_pairs_and_grows_with_k():
    gen = torch.Generator().manual_seed(1)
    img, txt = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    out = recall_at_k(img, txt, ks=(1, 5, 30))
    assert out["image_to_text@1"] <= out["image_to_text@5"] <= out["image_to_text@30"] == 1.0
    assert out["image_to_text@1"] < 0.5  # unrelated embeddings are not "retrieved"
    # rolled texts: image i's caption is at i+1, so nothing is correct at k=1
    assert recall_at_k(img, torch.roll(img, 1, 0), ks=(1,))["image_to_text@1"] == 0.0


def test_retrieval_recall_of_a_tiny_clip_treats_duplicate_captions_as_matches():
    bundle = tiny_bundle(seed=4)
    images = toy_data(2).images
    captions = [f"an emoji of a {CLASSES[int(c)]}" for c in toy_data(2).labels]  # pairs share text
    out = retrieval_recall(bundle.model, bundle.tokenizer, images, captions, ks=(1, 8))
    assert set(out) == {"image_to_text@1", "text_to_image@1", "image_to_text@8", "text_to_image@8"}
    assert out["image_to_text@8"] == 1.0  # 8 texts = all of them: every image finds its caption
    assert 0.0 <= out["image_to_text@1"] <= 1.0
    with pytest.raises(DataError, match="pair them"):
        retrieval_recall(bundle.model, bundle.tokenizer, images, captions[:-1])


# --------------------------------------------------------------------------------------------
# the index


def test_index_round_trip_and_unique_ids(tmp_path):
    entries = [
        ModelEntry(id="zeroshot-a", kind="zeroshot", pool="a", path="zs.pt"),
        ModelEntry(
            id="wiseft-a-a0.50",
            kind="wiseft",
            pool="a",
            wise_alpha=0.5,
            path="w.pt",
            extra={"variant": "linear"},
        ),
    ]
    write_index(tmp_path / "finetune", entries)
    read = read_indices(tmp_path)
    assert [e.id for e in read] == ["zeroshot-a", "wiseft-a-a0.50"]
    assert read[0].path == str(tmp_path / "finetune" / "zs.pt")
    assert read[1].wise_alpha == 0.5 and read[1].extra == {"variant": "linear"}
    write_index(tmp_path / "other", entries[:1])
    with pytest.raises(DataError, match="unique"):
        read_indices(tmp_path)
    with pytest.raises(DataError, match="twice"):
        write_index(tmp_path / "x", entries + entries)
    with pytest.raises(ValueError):
        ModelEntry(id="x", kind="unknown-kind", path="x.pt")


# --------------------------------------------------------------------------------------------
# evaluation with shared towers


def accuracy_of(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == labels).float().mean())


def test_models_sharing_a_tower_share_feature_passes(tmp_path, monkeypatch):
    bundle = tiny_bundle(seed=5)
    zs = zs_classifier(bundle)
    probe = ImageClassifier(copy.deepcopy(zs.visual), make_head(torch.randn(4, 32)), True)
    ft = copy.deepcopy(zs)
    with torch.no_grad():
        ft.visual.proj.add_(0.1)
    meta = {"model_config": bundle.config}
    for name, clf in [("zs", zs), ("lin", probe), ("ft", ft)]:
        save_classifier(tmp_path / f"{name}.pt", clf, meta)
    train, test, shift = toy_data(4), toy_data(3, seed=1), toy_data(3, seed=2)
    from clipshift.classifier import extract_features

    bank = extract_features(zs.visual, train.images)
    save_knn(
        tmp_path / "knn.pt",
        bank,
        train.labels,
        {"visual_checkpoint": "zs.pt", "k": 3, "temperature": 0.07, "num_classes": 4},
    )
    entries = [
        ModelEntry(id=i, kind=k, pool="p", path=str(tmp_path / f"{f}.pt"))
        for i, k, f in [
            ("z", "zeroshot", "zs"),
            ("l", "linear", "lin"),
            ("k", "knn", "knn"),
            ("f", "finetuned", "ft"),
        ]
    ]
    calls = []
    real = ev.extract_features
    monkeypatch.setattr(
        ev, "extract_features", lambda v, *a, **kw: calls.append(1) or real(v, *a, **kw)
    )
    stats: dict = {}
    acc = evaluate_models(
        entries, {"test": test, "shift": shift}, batch_size=64, device="cpu", stats=stats
    )
    assert stats == {"feature_passes": 4, "towers": 2} and len(calls) == 4  # 2 towers × 2 sets
    for model, mid in [(zs, "z"), (probe, "l"), (ft, "f")]:
        assert acc[mid]["test"] == pytest.approx(accuracy(model, test))
        assert acc[mid]["shift"] == pytest.approx(accuracy(model, shift))
    # the k-NN model by hand: its bank, k=3 and T=0.07 on the shared tower's test features
    votes = knn_predict(bank, train.labels, extract_features(zs.visual, test.images), 3, 4, 0.07)
    assert acc["k"]["test"] == pytest.approx(accuracy_of(votes, test.labels))
    assert set(acc["k"]) == {"test", "shift"}


# --------------------------------------------------------------------------------------------
# end to end on a tiny world


def _write_labelled(root, name, role, data, captions=False, extra=None):
    info = DatasetInfo(
        name=name,
        role=role,
        num_samples=0,
        classes=list(CLASSES),
        image_size=32,
        extra=extra or {},
    )
    with ShardWriter(root / name, info, shard_size=1000) as writer:
        for key, img, label in zip(data.keys, data.images, data.labels.tolist(), strict=True):
            sample = {"__key__": key, "png": Image.fromarray(img.permute(1, 2, 0).numpy())}
            if captions:
                sample["txt"] = f"an emoji of a {CLASSES[label]}"
            else:
                sample["cls"] = label
                sample["txt"] = CLASSES[label]
            writer.write(sample)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    for i, (name, role) in enumerate(
        [
            ("train", "train"),
            ("val", "val"),
            ("test", "test"),
            ("shift-a", "shift"),
            ("shift-b", "shift"),
        ]
    ):
        # shift-a carries no tag (it counts as natural-unseen), shift-b a style-covered one
        extra = {"shift_group": "natural-covered"} if name == "shift-b" else None
        _write_labelled(
            data, name, role, toy_data(8 if name == "train" else 4, seed=10 + i), extra=extra
        )
    _write_labelled(data, "retrieval", "retrieval", toy_data(3, seed=20), captions=True)
    for seed, pool in [(0, "diverse"), (1, "narrow")]:
        bundle = tiny_bundle(seed=seed)
        path = root / "models" / "pretrain" / pool / "checkpoint.pt"
        save_open_clip_checkpoint(path, bundle.model, bundle.name, bundle.config)
    # an excluded (leaked) test image must not be evaluated
    (root / "validate").mkdir()
    (root / "validate" / "exclude.json").write_text(json.dumps({"test": ["s12-0000"]}))
    ext = root / "external.csv"
    ext.write_text(
        "model,id,shift-a,shift-b\nref1,0.30,0.20,0.10\nref2,0.60,0.40,0.30\nref3,0.90,0.70,0.60\n"
    )
    return root


def test_stages_end_to_end(world):
    models = world / "models"
    specs = [
        BaselineSpec(width=32, layers=1, epochs=e, fraction=f)
        for e, f in [(1, 0.5), (2, 1.0), (3, 1.0)]
    ]
    ft = run_finetune(
        FinetuneConfig(
            data_dir=str(world / "data"),
            pretrain_dir=str(models / "pretrain"),
            out_dir=str(models / "finetune"),
            pool="diverse",
            e2e_epochs=1,
            e2e_batch_size=16,
            e2e_lr=1e-3,
            soup_ingredients=[SoupIngredient(lr=5e-4, epochs=1)] * 3,
            linear_epochs=20,
            baselines=specs,
            batch_size=64,
            templates=["a {}."],
        ),
        progress=False,
    )
    assert ft["pools"] == ["diverse", "narrow"]
    assert {
        "zeroshot-narrow",
        "linear-narrow",
        "knn-narrow",
        "finetuned-diverse-1",
        "baseline-02",
    } <= set(ft["models"])
    assert "finetuned-narrow-0" not in ft["models"]

    inter = run_interpolate(
        InterpolateConfig(
            data_dir=str(world / "data"),
            finetune_dir=str(models / "finetune"),
            out_dir=str(models / "interpolate"),
            alphas=[0.0, 0.5, 1.0],
            batch_size=64,
        )
    )
    assert set(inter["end_to_end"]["val_accuracy"]) == {"0", "0.5", "1"}
    for variant in ("end_to_end", "linear"):  # the best on val; ties go to the smaller α
        val = inter[variant]["val_accuracy"]
        best = min(float(a) for a, v in val.items() if v == max(val.values()))
        assert inter[variant]["chosen_wise_alpha"] == best, variant
    assert set(inter["soups"]) == {"uniform", "greedy"}
    val_accs = [ft["models"][f"finetuned-diverse-{i}"]["val_accuracy"] for i in range(4)]
    assert inter["soups"]["greedy"]["val_accuracy"] >= max(val_accs)

    cfg = EvaluateConfig(
        data_dir=str(world / "data"),
        models_dir=str(models),
        validate_dir=str(world / "validate"),
        metrics_path=str(world / "metrics" / "evaluate.json"),
        plots_dir=str(world / "plots"),
        external_baselines=str(world / "external.csv"),
        retrieval_ks=[1, 5],
        batch_size=64,
        out_dir=str(world / "evaluate"),
        bootstrap=200,
    )
    summary = ev.run_evaluate(cfg, progress=False)
    metrics = json.loads((world / "metrics" / "evaluate.json").read_text())
    assert set(metrics["baseline_fit"]) == {"shift-a", "shift-b", "avg"}
    rec = metrics["models"]["wiseft-diverse-a0.5"]
    assert rec["kind"] == "wiseft" and rec["wise_alpha"] == 0.5 and rec["pool"] == "diverse"
    assert set(rec["accuracy"]) == {"val", "test", "shift-a", "shift-b"}
    assert set(rec["effective_robustness"]) == {"shift-a", "shift-b"}
    for key in ("id_accuracy", "ood_accuracy_avg", "effective_robustness_avg"):
        assert isinstance(rec[key], float)
    assert metrics["models"]["wiseft-linear-diverse-a0.5"]["variant"] == "linear"
    assert "external/ref2" in metrics["models"]
    assert metrics["num_examples"]["test"] == 15  # 16 minus the excluded key
    assert set(metrics["retrieval"]) == {"diverse", "narrow"}
    assert set(metrics["retrieval"]["narrow"]) == {
        "image_to_text@1",
        "text_to_image@1",
        "image_to_text@5",
        "text_to_image@5",
    }
    assert summary["selected"]["wiseft_end-to-end"].startswith("wiseft-diverse-")
    # α=0 of the sweep is the zero-shot model: same accuracies everywhere
    assert (
        metrics["models"]["wiseft-diverse-a0"]["accuracy"]
        == metrics["models"]["zeroshot-diverse"]["accuracy"]
    )
    # evaluate scores val independently of interpolate: the same sweep accuracies
    for alpha, val in inter["end_to_end"]["val_accuracy"].items():
        rec = metrics["models"][f"wiseft-diverse-a{alpha}"]
        assert rec["accuracy"]["val"] == pytest.approx(val, abs=1e-6)
    _check_robustness_outputs(world, metrics, summary)
    with open(world / "plots" / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(metrics["models"]) and "er_shift-a" in rows[0]
    for name in ("shift-a", "shift-b", "avg", "group-natural", "group-natural-covered"):
        assert (
            world / "plots" / "scatter" / f"effective_robustness_{name}.png"
        ).stat().st_size > 1000


def _check_robustness_outputs(world, metrics, summary):
    """Shift groups from dataset.json, intervals, the per-class counts and the findings."""
    assert metrics["shift_groups"] == {"shift-a": "natural-unseen", "shift-b": "natural-covered"}
    assert metrics["groups"] == {
        "natural-covered": ["shift-b"],
        "natural-unseen": ["shift-a"],
        "natural": ["shift-a", "shift-b"],
    }
    assert set(metrics["group_fit"]) == set(metrics["groups"])
    assert metrics["bootstrap"] == {
        "unit": "class",
        "replicates": 200,
        "seed": 0,
        "num_classes": 4,
        "fixed_models": ["external/ref1", "external/ref2", "external/ref3"],
    }
    # the per-class counts add up to every accuracy the stage reports
    counts = read_counts(world / "evaluate" / "per_class.json")
    for i, mid in enumerate(counts.models):
        for j, name in enumerate(counts.datasets):
            ratio = counts.correct[i, j].sum() / counts.total[j].sum()
            assert metrics["models"][mid]["accuracy"][name] == pytest.approx(ratio, abs=1e-6)
    rec = metrics["models"]["zeroshot-diverse"]
    lo, hi = rec["ci95"]["id_accuracy"]
    assert lo <= rec["id_accuracy"] <= hi
    assert set(rec["ci95"]["effective_robustness_group"]) == set(metrics["groups"])
    # external rows are fixed across replicates: a zero-width interval
    ext = metrics["models"]["external/ref2"]["ci95"]["id_accuracy"]
    assert ext == [0.6, 0.6]
    findings = metrics["findings"]
    assert set(findings) == {
        "baselines_on_line",
        "zeroshot_above_line",
        "finetune_loses_robustness",
        "wiseft_beats_both",
        "diverse_beats_narrow",
        "unseen_style_robustness",
    }  # no supervised-diverse model: language_not_the_cause is left out
    for entry in findings.values():
        assert entry["ci95"][0] <= entry["ci95"][1]
    zs_er = rec["effective_robustness_group"]
    assert findings["zeroshot_above_line"]["value"] == pytest.approx(zs_er["natural-covered"])
    assert findings["unseen_style_robustness"]["value"] == pytest.approx(zs_er["natural-unseen"])
    ft = metrics["models"]["wiseft-diverse-a1"]["effective_robustness_group"]["natural"]
    assert findings["finetune_loses_robustness"]["value"] == pytest.approx(zs_er["natural"] - ft)
    wise = findings["wiseft_beats_both"]
    assert wise["model"] == summary["selected"]["wiseft_end-to-end"]
    assert wise["fixed_alpha"]["alpha"] == 0.5
