"""The built-in ImageNet testbed line (``evaluate.external_baselines: imagenet-testbed``).

The shipped table parses and is package data; the baseline selection is the testbed's
``STANDARD`` models (counted here from the CSV itself, with pandas, not from our reader); the
ImageNetV2 line reproduces Taori et al.'s observation (logit-linear, R² > 0.9); subset shifts
are fitted against ImageNet accuracy on their classes; a model above the line gets positive
effective robustness; and one zero-shot model on a tiny ImageNet-layout world built here gets
its ER on every shift with no baseline trained.
"""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError

from clipshift.classifier import predict_logits
from clipshift.config import TESTBED, EvaluateConfig, load_params
from clipshift.data.loaders import load_labelled
from clipshift.errors import DataError
from clipshift.methods import testbed as tb
from clipshift.methods.metrics import masked_argmax
from clipshift.methods.robustness import (
    class_subset_id,
    effective_robustness,
    fit_baseline,
    load_external_baselines,
    predict_ood,
    summarise,
)
from clipshift.plots import _model_points
from clipshift.stages.evaluate import run_evaluate
from clipshift.stages.fetch import run_fetch
from tests.test_imagenet_layout import R_SUBSET, WNIDS, image_folder, params_yaml, zero_shot_model

REPO = Path(__file__).resolve().parents[1]
ALL_SHIFTS = list(tb.SHIFTS)  # user datasets named after the testbed's shifts
SUBSET_SHIFTS = [s for s, t in tb.SHIFTS.items() if t.id_column]


def shipped_frame() -> pd.DataFrame:
    with resources.as_file(resources.files("clipshift") / "refdata" / tb.CSV_NAME) as path:
        return pd.read_csv(path)


# --------------------------------------------------------------------------------------------
# the shipped table


def test_shipped_table_parses_with_its_notice_and_is_package_data():
    rows = tb.read_testbed()
    frame = shipped_frame()
    assert len(rows) == len(frame) == 338  # the testbed's 338 models
    needed = {tb.ID_COLUMN} | {t.column for t in tb.SHIFTS.values()}
    needed |= {t.id_column for t in tb.SHIFTS.values() if t.id_column}
    assert needed <= set(frame.columns)
    values = frame[sorted(needed)].to_numpy(dtype=float)
    assert np.nanmin(values) >= 0 and np.nanmax(values) <= 100  # percents
    refdata = resources.files("clipshift") / "refdata"
    notice = (refdata / "LICENSE-imagenet-testbed").read_text()
    assert "MIT License" in notice and "Rohan Taori" in notice
    assert "f4083a29524fe9a9e029bf34d1476cea5a497132" in (refdata / "README.md").read_text()
    # every shipped file is matched by a package-data pattern, so an installed package has it
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["clipshift"]
    for item in (REPO / "src" / "clipshift" / "refdata").iterdir():
        rel = f"refdata/{item.name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_baselines_are_the_standard_models_with_every_needed_value():
    frame = shipped_frame()
    standard = frame[frame["model_type"] == "STANDARD"]
    v2 = tb.load_testbed_baselines(["imagenet-v2"])
    assert len(v2["model"]) == len(standard)  # every STANDARD model has ImageNetV2
    full = tb.load_testbed_baselines(ALL_SHIFTS, subset_shifts=SUBSET_SHIFTS)
    complete = standard.dropna(subset=["imagenet-r", "val-on-imagenet-r-classes"])
    assert 0 < len(full["model"]) == len(complete) < len(standard)
    assert set(full["model"]) == set(complete["model"])
    assert {"resnet50", "vgg16", "efficientnet-b0"} <= set(full["model"])
    others = frame.loc[frame["model_type"] != "STANDARD", "model"]
    assert not set(others) & set(v2["model"])  # no extra data, interventions, low-accuracy
    # fractions, and subset shifts carry ImageNet accuracy on their own classes
    by_model = complete.set_index("model")
    i = full["model"].index("resnet50")
    assert full["id"][i] == pytest.approx(by_model.loc["resnet50", "val"] / 100)
    key = class_subset_id("id", "imagenet-r")
    assert full[key][i] == pytest.approx(
        by_model.loc["resnet50", "val-on-imagenet-r-classes"] / 100
    )
    assert class_subset_id("id", "imagenet-sketch") not in full


def test_imagenet_v2_is_logit_linear_in_imagenet_accuracy():
    """Taori et al. (2020) / Recht et al. (2019): ImageNetV2 accuracy is a linear function of
    ImageNet accuracy on logit axes, below y = x."""
    table = tb.load_testbed_baselines(["imagenet-v2"])
    fit = fit_baseline(table["id"], table["imagenet-v2"], "logit")
    assert fit.n == len(table["model"])
    assert fit.r2 > 0.9
    assert predict_ood(fit, 0.8) < 0.8  # every ImageNet model loses accuracy on V2


def test_model_above_the_testbed_line_has_positive_effective_robustness():
    table = tb.load_testbed_baselines(ALL_SHIFTS, subset_shifts=SUBSET_SHIFTS)
    id_acc = {"test": 0.80, **{class_subset_id("test", s): 0.92 for s in SUBSET_SHIFTS}}
    expected = {}
    accuracy = dict(id_acc)
    for s in ALL_SHIFTS:
        x = table[class_subset_id("id", s)] if s in SUBSET_SHIFTS else table["id"]
        line = fit_baseline(x, table[s])
        mine = id_acc[class_subset_id("test", s) if s in SUBSET_SHIFTS else "test"]
        accuracy[s] = float(predict_ood(line, mine)) + 0.05  # 5 points above the line
        expected[s] = effective_robustness(line, mine, accuracy[s])
    models = {"clip-ft": {"kind": "finetuned", "accuracy": accuracy}}
    out = summarise(models, "test", ALL_SHIFTS, [], external=table, subset_shifts=SUBSET_SHIFTS)
    er = out["models"]["clip-ft"]["effective_robustness"]
    for s in ALL_SHIFTS:
        assert er[s] == pytest.approx(expected[s]) and er[s] == pytest.approx(0.05, abs=1e-9)
    assert out["models"]["clip-ft"]["effective_robustness_avg"] > 0
    assert out["baseline_fit"]["imagenet-r"]["x"] == "test-on-imagenet-r-classes"
    assert out["baseline_fit"]["imagenet-v2"]["x"] == "test"
    assert out["baseline_fit"]["imagenet-v2"]["n"] == len(table["model"])
    # the scatter's points for a subset shift sit at the subset ID accuracy
    assert _model_points(out, "imagenet-r")["clip-ft"]["x"] == 0.92
    assert _model_points(out, "imagenet-v2")["clip-ft"]["x"] == 0.80


# --------------------------------------------------------------------------------------------
# mapping and configuration errors


def test_shift_names_map_by_name_or_explicitly():
    assert tb.map_shifts(["imagenet-r", "rendition"], {"rendition": "imagenet-r"}) == {
        "imagenet-r": "imagenet-r",
        "rendition": "imagenet-r",
    }
    with pytest.raises(DataError, match=r"\['sketches'\] have no ImageNet-testbed counterpart"):
        tb.map_shifts(["imagenet-r", "sketches"], {})
    with pytest.raises(DataError, match="not shift datasets"):
        tb.map_shifts(["imagenet-r"], {"imagenet-rr": "imagenet-r"})
    with pytest.raises(DataError, match="covers every class"):
        tb.load_testbed_baselines(["imagenet-r"], subset_shifts=[])
    with pytest.raises(DataError, match="scored over all 1000"):
        tb.load_testbed_baselines(["imagenet-sketch"], subset_shifts=["imagenet-sketch"])


def test_bad_external_baselines_values_are_clear_config_errors():
    assert EvaluateConfig(external_baselines=TESTBED).external_baselines == TESTBED
    with pytest.raises(ValidationError, match="CSV path or 'imagenet-testbed'"):
        EvaluateConfig(external_baselines="imagenet-testbd")
    with pytest.raises(ValidationError, match="testbed_shifts"):
        EvaluateConfig(external_baselines=TESTBED, testbed_shifts={"sketches": "imagenet-b"})
    with pytest.raises(ValidationError, match="set external_baselines: imagenet-testbed"):
        EvaluateConfig(testbed_shifts={"sketches": "imagenet-sketch"})


def test_a_csv_may_carry_the_subset_id_column(tmp_path):
    csv = tmp_path / "ext.csv"
    csv.write_text("model,id,imagenet-r,id-on-imagenet-r-classes\na,70,30,90\nb,80,40,95\n")
    table = load_external_baselines(csv, ["imagenet-r"], subset_shifts=["imagenet-r"])
    assert table["id-on-imagenet-r-classes"] == [0.90, 0.95]
    assert table["id"] == [0.70, 0.80]


# --------------------------------------------------------------------------------------------
# one model, a tiny ImageNet-layout world, no baseline training


def test_one_model_gets_effective_robustness_on_every_shift(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imagenet" / "val", list(WNIDS), 4, "JPEG", seed=0)
    image_folder(tmp_path / "imagenet-r", R_SUBSET, 4, "jpg", seed=1)
    image_folder(tmp_path / "imagenet-sketch", list(WNIDS), 3, "JPEG", seed=2)
    params = yaml.safe_load(params_yaml(tmp_path))
    params["evaluate"].update(external_baselines=TESTBED, external_mode="join", bootstrap=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_params(tmp_path / "params.yaml")

    classes = run_fetch(cfg.fetch, progress=False)["task"]["classes"]
    clf = zero_shot_model(tmp_path / "models", classes)  # the only model: no baselines
    summary = run_evaluate(cfg.evaluate, progress=False)

    shifts = ["imagenet-r", "imagenet-sketch"]
    table = tb.load_testbed_baselines(shifts, subset_shifts=["imagenet-r"])
    assert summary["testbed"] == {
        "model_type": "STANDARD",
        "models": len(table["model"]),
        "shifts": {s: s for s in shifts},
    }
    assert summary["baselines"]["fitted"] == sorted(
        (f"external/{m}" for m in table["model"]),
        key=lambda m: summary["models"][m]["id_accuracy"],
    )
    subset_id = class_subset_id("imagenet-val", "imagenet-r")
    assert summary["baseline_fit"]["imagenet-r"]["x"] == subset_id
    assert summary["class_subsets"] == {"imagenet-r": 2}
    # the x of -R: val images of -R's classes, scored over those classes (by hand)
    val = load_labelled(tmp_path / "data" / "fetch" / "imagenet-val")
    mask = torch.tensor([c in {WNIDS[w] for w in R_SUBSET} for c in classes])
    keep = mask[val.labels]
    pred = masked_argmax(predict_logits(clf, val.images[keep]), mask)
    rec = summary["models"]["zs-tiny"]
    assert rec["accuracy"][subset_id] == float((pred == val.labels[keep]).float().mean())
    # its ER on every shift is its distance to the testbed's own line
    for shift, x_key in [
        ("imagenet-r", class_subset_id("id", "imagenet-r")),
        ("imagenet-sketch", "id"),
    ]:
        line = fit_baseline(table[x_key], table[shift])
        x = rec["accuracy"][summary["baseline_fit"][shift]["x"]]
        assert rec["effective_robustness"][shift] == pytest.approx(
            effective_robustness(line, x, rec["accuracy"][shift])
        )
        assert summary["baseline_fit"][shift]["slope"] == pytest.approx(line.slope)
    scatter = tmp_path / "plots" / "evaluate" / "scatter"
    assert (scatter / "effective_robustness_imagenet-r.png").stat().st_size > 10_000
