"""Fine-tuning, linear probe, k-NN and baselines on tiny in-memory data and tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipshift.classifier import ImageClassifier, clip_classifier, load_classifier, make_head
from clipshift.config import BaselineSpec
from clipshift.data.loaders import LabelledData
from clipshift.methods.baselines import stratified_subset, train_baselines
from clipshift.methods.finetuning import augment, finetune_end_to_end
from clipshift.methods.knn import knn_predict
from clipshift.methods.linear_probe import train_linear_probe
from clipshift.methods.metrics import accuracy
from clipshift.methods.zeroshot import zeroshot_head
from clipshift.models import create_clip, tiny_vit_config
from clipshift.tracking_api import RecordingTracker
from clipshift.train_utils import cosine_lr

CLASSES = ["cat", "dog", "car", "tree"]


def tiny_bundle(seed: int = 0, name: str = "test-tiny-w32-l1"):
    torch.manual_seed(seed)
    return create_clip(name, config=tiny_vit_config(32, 1))


def toy_data(per_class: int = 12, classes=CLASSES, seed: int = 0, size: int = 32) -> LabelledData:
    """Learnable toy images: a class colour plus a bright square at a class position, + noise."""
    gen = torch.Generator().manual_seed(seed)
    n_cls = len(classes)
    colours = torch.tensor(
        [
            [200, 40, 40],
            [40, 200, 40],
            [40, 40, 200],
            [200, 200, 40],
            [200, 40, 200],
            [40, 200, 200],
        ]
    )[:n_cls]
    labels = torch.arange(n_cls).repeat_interleave(per_class)
    images = colours[labels].view(-1, 3, 1, 1).expand(-1, 3, size, size).float().clone()
    half = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c % 4, 2)
        images[i, :, r * half : r * half + half // 2, q * half : q * half + half // 2] = 255
    images += 25 * torch.randn(images.shape, generator=gen)
    keys = [f"s{seed}-{i:04d}" for i in range(len(labels))]
    return LabelledData(images.clamp(0, 255).to(torch.uint8), labels, keys, list(classes))


def zs_classifier(bundle, classes=CLASSES) -> ImageClassifier:
    head = zeroshot_head(bundle.model, bundle.tokenizer, classes, ["a {}.", "a photo of a {}."])
    return clip_classifier(bundle.model, head)


def test_finetuning_raises_train_accuracy():
    bundle = tiny_bundle()
    train = toy_data(12)
    clf = zs_classifier(bundle)
    before = accuracy(clf, train)
    tracker = RecordingTracker()
    finetune_end_to_end(
        clf, train, train, epochs=6, lr=2e-3, batch_size=16, seed=0, tracker=tracker, device="cpu"
    )
    after = accuracy(clf, train)
    assert after >= 0.9 and after > before
    logged = {k for _, m in tracker.metrics for k in m}
    assert {"finetune/loss", "finetune/val_accuracy"} <= logged
    assert not clf.training


def test_finetuning_is_reproducible_with_a_seed():
    train = toy_data(4)
    runs = []
    for _ in range(2):
        clf = zs_classifier(tiny_bundle())
        finetune_end_to_end(clf, train, epochs=1, lr=1e-3, batch_size=8, seed=3, device="cpu")
        runs.append(clf.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_augment_keeps_shape_dtype_and_is_seeded():
    images = toy_data(2).images
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, images)


def test_fine_tuning_schedule_warms_up_then_decays_to_zero():
    def f(step: int) -> float:  # the LR multiplier finetune_end_to_end applies
        return cosine_lr(step, 1.0, 10, 100)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert f(30) > f(60) > f(90)


def _clusters(n_per: int, n_cls: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Features around fixed class centres (the centres do not depend on ``seed``)."""
    centres = F.normalize(
        torch.randn(n_cls, dim, generator=torch.Generator().manual_seed(99)), dim=-1
    )
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_cls).repeat_interleave(n_per)
    feats = 3 * centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return feats, labels


def test_knn_on_separable_features_is_perfect():
    train_x, train_y = _clusters(10, 5)
    test_x, test_y = _clusters(7, 5, seed=1)
    probs = knn_predict(train_x, train_y, test_x, k=5, num_classes=5)
    assert probs.shape == (35, 5)
    assert torch.allclose(probs.sum(1), torch.ones(35))
    assert torch.equal(probs.argmax(1), test_y)


def test_knn_votes_are_similarity_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # Two votes for class 1 are far less similar than the one for class 0: weighted vote wins.
    assert knn_predict(bank, labels, query, k=3, num_classes=2).argmax().item() == 0


def test_linear_probe_fits_separable_features_and_picks_weight_decay_on_val():
    x, y = _clusters(20, 4, spread=0.3)
    xv, yv = _clusters(10, 4, spread=0.3, seed=1)
    head, info = train_linear_probe(
        x, y, xv, yv, num_classes=4, weight_decays=[1e-4, 1e-2, 10.0], steps=60, lr=0.05
    )
    assert float((head(F.normalize(x, dim=-1)).argmax(1) == y).float().mean()) == 1.0
    # Every strength separates these clusters on val: ties go to the strongest regulariser.
    assert info["val_accuracy"] == {"0.0001": 1.0, "0.01": 1.0, "10.0": 1.0}
    assert info["weight_decay"] == 10.0
    assert head.weight.shape == (4, 16) and not head.weight.requires_grad


def test_stratified_subset_keeps_every_class():
    labels = torch.arange(4).repeat_interleave(10)
    idx = stratified_subset(labels, 0.25, seed=0)
    counts = torch.bincount(labels[idx], minlength=4)
    assert counts.tolist() == [2, 2, 2, 2]  # round(2.5) = 2 per class
    assert torch.equal(stratified_subset(labels, 0.25, 0), idx)
    assert len(stratified_subset(labels, 0.01, 0)) == 4  # at least one per class
    assert len(stratified_subset(labels, 1.0, 0)) == 40


def test_baselines_train_and_differ_across_specs():
    train, val = toy_data(8), toy_data(4, seed=1)
    specs = [
        BaselineSpec(width=32, layers=1, epochs=1, fraction=0.5),
        BaselineSpec(width=32, layers=1, epochs=3, fraction=1.0),
        BaselineSpec(width=64, layers=1, epochs=2, fraction=1.0),
    ]
    out = train_baselines(specs, train, val, image_size=32, seed=0, device="cpu")
    assert [m.id for m in out] == ["baseline-00", "baseline-01", "baseline-02"]
    assert out[0].meta["train_samples"] == 16 and out[1].meta["train_samples"] == 32
    assert out[2].clf.head.in_features == 64
    assert not out[0].clf.normalize_features  # standard supervised models
    w0 = out[0].clf.state_dict()["head.weight"]
    assert not torch.equal(w0, out[1].clf.state_dict()["head.weight"])
    assert all(m.val_accuracy is not None and 0 <= m.val_accuracy <= 1 for m in out)
    assert out[1].meta["spec"]["epochs"] == 3


def test_make_head_copies_weights():
    w = torch.randn(3, 32)
    head = make_head(w)
    w.zero_()
    assert head.weight.abs().sum() > 0 and torch.equal(head.bias, torch.zeros(3))
    clf = ImageClassifier(copy.deepcopy(tiny_bundle().model.visual), head)
    assert clf.num_classes == 3


# --------------------------------------------------------------------------------------------
# starting points (WiSE-FT): every fine-tune and the probe start from the zero-shot classifier


def _first_forward(clf: ImageClassifier) -> dict[str, torch.Tensor]:
    """Records the input and logits of ``clf``'s first forward call."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        if not seen:
            seen["x"], seen["logits"] = args[0].detach().clone(), output.detach().clone()

    clf.register_forward_hook(hook)
    return seen


def test_finetuning_starts_from_the_zero_shot_head():
    zs = zs_classifier(tiny_bundle()).eval()
    clf = copy.deepcopy(zs)
    seen = _first_forward(clf)
    finetune_end_to_end(clf, toy_data(4), epochs=1, lr=1e-3, batch_size=8, device="cpu")
    with torch.no_grad():
        expected = zs(seen["x"])  # the zero-shot classifier's logits on that very batch
    assert torch.allclose(seen["logits"], expected, atol=1e-5)
    # and training moved it away from there
    assert not torch.equal(clf.head.weight, zs.head.weight)


def test_the_stage_fine_tunes_copies_of_the_zero_shot_classifier(tmp_path, monkeypatch):
    from clipshift.config import FinetuneConfig, SoupIngredient
    from clipshift.stages import finetune as stage
    from clipshift.tracking_api import NullTracker

    bundle = tiny_bundle()
    zs = zs_classifier(bundle).eval()
    calls = []

    def fake(clf, train, val, **kw):  # what each fine-tune starts from, and with what
        calls.append(kw)
        assert clf is not zs
        assert all(torch.equal(v, zs.state_dict()[k]) for k, v in clf.state_dict().items())
        with torch.no_grad():
            clf.head.weight.add_(1.0)  # a fine-tune must not leak into the next one's start
        return clf.eval()

    monkeypatch.setattr(stage, "finetune_end_to_end", fake)
    ingredients = [
        SoupIngredient(lr=lr, epochs=i + 1, augment=0.5) for i, lr in enumerate([1e-4, 2e-4, 3e-4])
    ]
    cfg = FinetuneConfig(e2e_lr=3e-4, e2e_epochs=2, soup_ingredients=ingredients, seed=5)
    data = toy_data(2)
    st = stage._Stage(cfg, tmp_path, data, data, CLASSES, torch.device("cpu"), NullTracker(), False)
    meta = {"model_config": bundle.config, "classnames": CLASSES, "pool": "diverse"}
    stage._end_to_end(st, "diverse", zs, meta)
    assert [(c["lr"], c["epochs"], c["seed"]) for c in calls] == [
        (3e-4, 2, 5), (1e-4, 1, 6), (2e-4, 2, 7), (3e-4, 3, 8)
    ]  # fmt: skip
    assert [c["augment_strength"] for c in calls] == [1.0, 0.5, 0.5, 0.5]
    assert [e.id for e in st.entries] == [f"finetuned-diverse-{i}" for i in range(4)]
    assert [e.extra["main"] for e in st.entries] == [True, False, False, False]
    assert st.entries[2].extra["lr"] == 2e-4 and st.entries[2].extra["augment"] == 0.5


def test_augment_strength_scales_the_jitter():
    images = toy_data(4).images
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert torch.equal(augment(images, gen(), 0.0), images)  # identity ranges: no change
    moved = [(augment(images, gen(), s).float() - images.float()).abs().mean() for s in (0.3, 1)]
    assert 0 < moved[0] < moved[1]


def test_linear_probe_starts_from_the_given_head():
    x, y = _clusters(10, 4, dim=16)
    init = make_head(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)) * 10)
    before = init.weight.clone()
    head, _ = train_linear_probe(x, y, num_classes=4, steps=0, init=init)
    assert torch.equal(head.weight, init.weight) and torch.equal(head.bias, init.bias)
    lr = 1e-3  # one Adam step moves each weight by at most ~lr
    head, _ = train_linear_probe(x, y, num_classes=4, steps=1, lr=lr, init=init)
    assert (head.weight - init.weight).abs().max() <= 1.01 * lr
    assert torch.equal(init.weight, before)  # the init head is copied, never trained
    with pytest.raises(ValueError, match="shape"):
        train_linear_probe(x, y, num_classes=5, steps=1, init=init)


def test_the_stage_probe_starts_at_the_zero_shot_head(tmp_path):
    from clipshift.config import FinetuneConfig
    from clipshift.stages import finetune as stage
    from clipshift.tracking_api import NullTracker

    bundle = tiny_bundle()
    zs = zs_classifier(bundle).eval()
    cfg = FinetuneConfig(linear_epochs=1, linear_lr=1e-3, soup_ingredients=[])
    data = toy_data(2)
    st = stage._Stage(cfg, tmp_path, data, data, CLASSES, torch.device("cpu"), NullTracker(), False)
    meta = {"model_config": bundle.config, "classnames": CLASSES, "pool": "diverse"}
    stage._linear_and_knn(st, "diverse", zs, meta)
    probe = load_classifier(tmp_path / "linear-diverse.pt")[0]
    # one step from the zero-shot head (weights ~±1); from zeros it would be ~lr everywhere
    assert (probe.head.weight - zs.head.weight).abs().max() <= 1.01e-3
    assert zs.head.weight.abs().mean() > 0.1


def test_soups_need_four_fine_tunes_or_none():
    from pydantic import ValidationError

    from clipshift.config import FinetuneConfig, SoupIngredient

    two = [SoupIngredient(lr=1e-4, epochs=1)] * 2
    with pytest.raises(ValidationError, match=r"at least 4 fine-tunes.*1 \+ 2"):
        FinetuneConfig(soup_ingredients=two)
    assert FinetuneConfig(soup_ingredients=[]).soup_ingredients == []
    assert len(FinetuneConfig(soup_ingredients=two + two[:1]).soup_ingredients) == 3
    assert len(FinetuneConfig().soup_ingredients) >= 3  # the defaults make a real soup
