"""WiSE-FT interpolation, the linear-classifier sweep, soups and α selection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipshift.classifier import ImageClassifier, extract_features, make_head
from clipshift.config import InterpolateConfig
from clipshift.errors import CheckpointError
from clipshift.methods.linear_probe import train_linear_probe
from clipshift.methods.metrics import accuracy
from clipshift.methods.wiseft import (
    SweepPoint,
    choose_wise_alpha,
    greedy_soup,
    interpolate_state_dicts,
    linear_wiseft_sweep,
    uniform_soup,
    wiseft_model,
    wiseft_sweep,
)
from tests.test_finetune import tiny_bundle, toy_data, zs_classifier

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _states(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t0 = {
        "w": torch.randn(3, 4, generator=gen),
        "b": torch.randn(3, generator=gen),
        "steps": torch.tensor(7),
    }
    t1 = {
        "w": torch.randn(3, 4, generator=gen),
        "b": torch.randn(3, generator=gen),
        "steps": torch.tensor(9),
    }
    return t0, t1


def test_endpoints_are_exact_and_middle_is_the_mean():
    t0, t1 = _states()
    t0["w"][0, 0] = float("inf")  # the formula would give nan at α=1; the endpoint must not
    at0, at1 = interpolate_state_dicts(t0, t1, 0.0), interpolate_state_dicts(t0, t1, 1.0)
    assert all(torch.equal(at0[k], t0[k]) for k in t0)
    assert all(torch.equal(at1[k], t1[k]) for k in t1)
    assert at0["w"].data_ptr() != t0["w"].data_ptr()  # clones, not aliases
    mid = interpolate_state_dicts(*_states(), 0.5)
    a, b = _states()
    assert torch.allclose(mid["w"], (a["w"] + b["w"]) / 2)
    assert torch.equal(mid["steps"], a["steps"])  # integer buffers come from θ0


def test_mismatched_keys_or_shapes_are_refused_with_the_differences():
    t0, t1 = _states()
    t1["extra.weight"] = torch.zeros(1)
    del t1["b"]
    with pytest.raises(
        CheckpointError, match=r"keys only in θ0: b.*keys only in θ1: extra\.weight"
    ):
        interpolate_state_dicts(t0, t1, 0.5)
    t0, t1 = _states()
    t1["w"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError, match=r"shapes differ: w: \(3, 4\) vs \(5, 4\)"):
        interpolate_state_dicts(t0, t1, 0.5)
    with pytest.raises(CheckpointError, match="same pretrained checkpoint"):
        uniform_soup([_states()[0], t1])
    with pytest.raises(ValueError):
        interpolate_state_dicts(*_states(), 1.5)


def test_uniform_soup_is_the_mean():
    t0, t1 = _states()
    soup = uniform_soup([t0, t1, t1])
    assert torch.allclose(soup["w"], (t0["w"] + 2 * t1["w"]) / 3, atol=1e-6)
    assert torch.equal(soup["steps"], t0["steps"])
    assert all(torch.equal(uniform_soup([t0])[k], t0[k]) for k in t0)


def test_choose_wise_alpha_picks_best_val_and_breaks_ties_towards_zero_shot():
    results = [
        {"wise_alpha": a, "val_accuracy": acc}
        for a, acc in [(0.0, 0.5), (0.3, 0.8), (0.5, 0.8), (1.0, 0.7)]
    ]
    assert choose_wise_alpha(results) == 0.3
    assert (
        choose_wise_alpha(
            [SweepPoint(0.9, 0.1, nn.Identity()), SweepPoint(0.2, 0.1, nn.Identity())]
        )
        == 0.2
    )


class _CountingVisual(nn.Module):
    """Wraps a tower and counts forward calls (batches)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.inner, self.calls = visual, 0
        self.image_size = visual.image_size

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture(scope="module")
def models():
    bundle = tiny_bundle(seed=2)
    zs = zs_classifier(bundle)
    gen = torch.Generator().manual_seed(0)
    ft = copy.deepcopy(zs)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 1e-3))
    return zs, ft, toy_data(6, seed=3)


def test_linear_sweep_uses_one_feature_pass_and_matches_full_evaluation(models):
    zs, _, val = models
    probe = make_head(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 5)
    counting = _CountingVisual(zs.visual)
    feats = extract_features(counting, val.images, batch_size=8)
    points = linear_wiseft_sweep(feats, val.labels, zs.head, probe, ALPHAS)
    assert counting.calls == 3  # 24 images / batch 8: one pass for the whole sweep
    assert [p.wise_alpha for p in points] == ALPHAS
    counting.calls = 0
    for p in points:  # e2e-style: a full classifier per α, evaluated from pixels
        state = interpolate_state_dicts(zs.head.state_dict(), probe.state_dict(), p.wise_alpha)
        clf = ImageClassifier(counting, make_head(state["weight"], state["bias"]), True)
        assert accuracy(clf, val, batch_size=8) == pytest.approx(p.val_accuracy)
    assert counting.calls == 3 * len(ALPHAS)
    assert torch.equal(points[0].model.weight, zs.head.weight)
    assert torch.equal(points[-1].model.weight, probe.weight)


def test_wiseft_sweep_endpoints_are_the_two_models(models):
    zs, ft, val = models
    points = wiseft_sweep(zs, ft, [0.0, 0.5, 1.0], val, batch_size=64)
    for point, ref in [(points[0], zs), (points[-1], ft)]:
        got, want = point.model.state_dict(), ref.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert point.val_accuracy == pytest.approx(accuracy(ref, val))
    mid = points[1].model.state_dict()["head.weight"]
    assert torch.allclose(mid, (zs.head.weight + ft.head.weight) / 2, atol=1e-6)


def test_greedy_soup_is_never_worse_than_the_best_single_model(models):
    zs, ft, val = models
    gen = torch.Generator().manual_seed(5)
    noisy = copy.deepcopy(ft)
    with torch.no_grad():  # a bad ingredient: heavily perturbed head
        noisy.head.weight.add_(
            3 * noisy.head.weight.abs().mean() * torch.randn(4, 32, generator=gen)
        )
    candidates = [noisy, zs, ft]
    singles = [accuracy(m, val) for m in candidates]
    soup = greedy_soup(candidates, val, batch_size=64)
    assert soup.val_accuracy >= max(singles)
    assert soup.singles == pytest.approx(singles)
    best = max(range(3), key=lambda i: (singles[i], -i))
    assert best in soup.members and soup.steps[0] == {
        "index": best,
        "val_accuracy": singles[best],
        "accepted": True,
    }
    model = copy.deepcopy(zs)
    model.load_state_dict(soup.state)
    assert accuracy(model, val) == pytest.approx(soup.val_accuracy)


# --------------------------------------------------------------------------------------------
# every float tensor is mixed, not only the head


def test_wiseft_mixes_every_float_tensor_and_keeps_integer_buffers(models):
    zs, ft = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    zs.visual.register_buffer("steps_seen", torch.tensor(3))  # an integer buffer
    ft.visual.register_buffer("steps_seen", torch.tensor(5))
    mid = wiseft_model(zs, ft, 0.5).state_dict()
    s0, s1 = zs.state_dict(), ft.state_dict()
    floats = [k for k, v in s0.items() if v.is_floating_point()]
    assert len(floats) > 10 and any(k.startswith("visual.transformer.") for k in floats)
    for key in floats:
        assert not torch.equal(s0[key], s1[key]), key  # the fixture moved every tensor
        assert torch.allclose(mid[key], (s0[key] + s1[key]) / 2, atol=1e-6), key
    tower = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.allclose(mid[tower], 0.5 * s0[tower] + 0.5 * s1[tower])
    assert mid["visual.steps_seen"].dtype == torch.int64 and int(mid["visual.steps_seen"]) == 3


# --------------------------------------------------------------------------------------------
# soups: a toy where the answer is known by construction


@pytest.fixture(scope="module")
def ingredients():
    """Three good classifiers (a linear probe on the tiny tower, each tensor jittered by 1 %)
    and a bad one whose head votes for a wrong class (rows rolled) 20× louder."""
    bundle = tiny_bundle(seed=2)
    zs = zs_classifier(bundle)
    train, val = toy_data(8, seed=4), toy_data(6, seed=5)
    head, _ = train_linear_probe(
        extract_features(zs.visual, train.images), train.labels, num_classes=4, steps=300, lr=0.05
    )
    good = ImageClassifier(copy.deepcopy(zs.visual), head, True)
    gen = torch.Generator().manual_seed(7)
    models = []
    for _ in range(3):
        m = copy.deepcopy(good)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=gen))
        models.append(m.eval())
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.head.weight.copy_(20 * good.head.weight.roll(1, dims=0))
        bad.head.bias.copy_(20 * good.head.bias.roll(1))
    models.insert(1, bad.eval())
    return models, val


def test_greedy_soup_rejects_a_bad_ingredient_and_uniform_averages_all(ingredients):
    models, val = ingredients
    singles = [accuracy(m, val) for m in models]
    assert min(singles[0], singles[2], singles[3]) >= 0.9 and singles[1] <= 0.3
    soup = greedy_soup(models, val, batch_size=64)
    assert soup.members == [0, 2, 3]  # the bad one (index 1) is left out
    assert soup.steps[-1]["index"] == 1 and soup.steps[-1]["accepted"] is False
    assert soup.steps[-1]["val_accuracy"] < soup.val_accuracy
    states = [m.state_dict() for m in models]
    good_mean = uniform_soup([states[i] for i in (0, 2, 3)])
    assert all(torch.allclose(soup.state[k], good_mean[k]) for k in good_mean)
    uniform = uniform_soup(states)
    for key in ("head.weight", "visual.conv1.weight"):
        assert torch.allclose(uniform[key], sum(s[key] for s in states) / 4, atol=1e-6)
    # the uniform soup swallowed the bad head: it does worse than the greedy one on val
    soup_model = copy.deepcopy(models[0])
    soup_model.load_state_dict(uniform)
    assert accuracy(soup_model, val) < soup.val_accuracy


# --------------------------------------------------------------------------------------------
# config


def test_alphas_must_include_the_papers_fixed_alpha():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"must include 0\.5"):
        InterpolateConfig(alphas=[0.0, 0.4, 1.0])
    assert InterpolateConfig(alphas=[1.0, 0.5, 0.0, 0.5]).alphas == [0.0, 0.5, 1.0]


def test_soups_without_ingredients_are_refused_across_sections():
    from clipshift.config import PipelineConfig
    from tests.tiny import full_params

    params = full_params({"finetune": {"soup_ingredients": []}})
    with pytest.raises(ValueError, match=r"interpolate\.soups.*soup_ingredients is empty"):
        PipelineConfig.model_validate(params)
    params["interpolate"]["soups"] = []
    assert PipelineConfig.model_validate(params).interpolate.soups == []


# --------------------------------------------------------------------------------------------
# the stage


def _finetune_dir(root, models, n_finetuned: int):
    """A finetune stage's output: zero-shot, linear probe and ``n_finetuned`` fine-tunes."""
    from clipshift.classifier import save_classifier
    from clipshift.registry import ModelEntry, write_index
    from tests.test_ddp_stages import write_labelled

    zs, ft, val = models
    write_labelled(root / "data", "val", "val", val)
    bundle = tiny_bundle(seed=2)
    meta = {"model_config": bundle.config, "classnames": list(val.classes), "pool": "diverse"}
    out, entries = root / "finetune", []
    probe = ImageClassifier(zs.visual, make_head(ft.head.weight, ft.head.bias), True)
    for name, kind, clf in [
        ("zeroshot-diverse", "zeroshot", zs),
        ("linear-diverse", "linear", probe),
    ]:
        save_classifier(out / f"{name}.pt", clf, meta)
        entries.append(ModelEntry(id=name, kind=kind, pool="diverse", path=f"{name}.pt"))
    for i in range(n_finetuned):
        clf = wiseft_model(zs, ft, 1.0 - 0.1 * i)  # distinct fine-tunes along the path
        save_classifier(out / f"finetuned-diverse-{i}.pt", clf, meta)
        entries.append(
            ModelEntry(
                id=f"finetuned-diverse-{i}",
                kind="finetuned",
                pool="diverse",
                path=f"finetuned-diverse-{i}.pt",
                extra={"main": i == 0},
            )
        )
    write_index(out, entries)
    return InterpolateConfig(
        data_dir=str(root / "data"),
        finetune_dir=str(out),
        out_dir=str(root / "interpolate"),
        alphas=[0.0, 0.5, 1.0],
        batch_size=64,
    )


def test_stage_reports_chosen_and_paper_alpha_and_the_greedy_soups_ingredients(tmp_path, models):
    import json

    from clipshift.stages.interpolate import run_interpolate

    cfg = _finetune_dir(tmp_path, models, 4)
    summary = run_interpolate(cfg)
    written = json.loads((tmp_path / "interpolate" / "interpolate.json").read_text())
    for curve in ("end_to_end", "linear"):
        rec = written[curve]
        assert rec["paper_wise_alpha"] == 0.5
        assert rec["paper_val_accuracy"] == rec["val_accuracy"]["0.5"]
        assert rec["chosen_val_accuracy"] == rec["val_accuracy"][f"{rec['chosen_wise_alpha']:g}"]
    greedy = written["soups"]["greedy"]
    ids = [f"finetuned-diverse-{i}" for i in range(4)]
    assert set(greedy["ingredients_val_accuracy"]) == set(ids)
    assert [s["ingredient"] for s in greedy["steps"]] == sorted(
        ids, key=lambda i: (-greedy["ingredients_val_accuracy"][i], i)
    )
    kept = [s["ingredient"] for s in greedy["steps"] if s["accepted"]]
    assert sorted(kept) == greedy["members"]
    assert written["soups"]["uniform"]["members"] == ids
    assert "seconds" in summary["soups"]["greedy"] and "seconds" not in greedy
    index = json.loads((tmp_path / "interpolate" / "index.json").read_text())
    paper = [e for e in index["models"] if e["extra"].get("paper_alpha")]
    assert sorted(e["id"] for e in paper) == ["wiseft-diverse-a0.5", "wiseft-linear-diverse-a0.5"]


def test_stage_refuses_a_soup_of_fewer_than_four(tmp_path, models):
    from clipshift.errors import DataError
    from clipshift.stages.interpolate import run_interpolate

    cfg = _finetune_dir(tmp_path, models, 3)
    with pytest.raises(DataError, match=r"at least 4 fine-tuned models.*wrote 3.*soups: \[\]"):
        run_interpolate(cfg)
    assert run_interpolate(cfg.model_copy(update={"soups": []}))["soups"] == {}
