"""WiSE-FT interpolation, the linear-classifier sweep, soups and α selection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipshift.classifier import ImageClassifier, extract_features, make_head
from clipshift.errors import CheckpointError
from clipshift.methods.metrics import accuracy
from clipshift.methods.wiseft import (
    SweepPoint,
    choose_wise_alpha,
    greedy_soup,
    interpolate_state_dicts,
    linear_wiseft_sweep,
    uniform_soup,
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
    state, members, soup_acc = greedy_soup(candidates, val, batch_size=64)
    assert soup_acc >= max(singles)
    best = max(range(3), key=lambda i: (singles[i], -i))
    assert best in members
    soup = copy.deepcopy(zs)
    soup.load_state_dict(state)
    assert accuracy(soup, val) == pytest.approx(soup_acc)
