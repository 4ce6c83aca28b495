"""The effective-robustness scatter and the scaling plot write readable PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipshift.methods.robustness import from_axis, summarise, to_axis
from clipshift.methods.scaling_laws import fit_power_law, fit_scaling_table
from clipshift.plots import plot_effective_robustness, plot_scaling

SHIFTS = ["shift-a", "shift-b"]


@pytest.fixture(scope="module")
def summary():
    models = {}
    for i, acc in enumerate(np.linspace(0.2, 0.8, 6)):
        ood = {
            s: float(from_axis(0.9 * to_axis(acc) - 1.0 - 0.3 * j)) for j, s in enumerate(SHIFTS)
        }
        models[f"base{i}"] = {"kind": "baseline", "accuracy": {"test": acc, **ood}}
    for pool, lift in [("diverse", 0.1), ("narrow", 0.02)]:
        for alpha in np.linspace(0, 1, 6):
            kind = {0.0: "zeroshot", 1.0: "finetuned"}.get(float(alpha), "wiseft")
            id_acc = 0.4 + 0.45 * float(alpha)
            models[f"{pool}/a{alpha:.1f}"] = {
                "kind": kind,
                "pool": pool,
                "wise_alpha": float(alpha),
                "accuracy": {
                    "test": id_acc,
                    "shift-a": 0.25 + lift * np.sin(np.pi * alpha),
                    "shift-b": 0.15 + lift,
                },
            }
        models[f"{pool}/soup"] = {
            "kind": "soup",
            "pool": pool,
            "accuracy": {"test": 0.86, "shift-a": 0.3, "shift-b": 0.2},
        }
    ext = {"model": ["e1", "e2"], "id": [0.3, 0.6], "shift-a": [0.1, 0.25], "shift-b": [0.05, 0.15]}
    base = [m for m in models if m.startswith("base")]
    return summarise(models, "test", SHIFTS, base, external=ext)


def _check_png(path, min_size=(500, 400)):
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.size[0] <= 1400 and image.size[1] <= 900
        # Not blank: many distinct colours were drawn.
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 50


@pytest.mark.parametrize("shift", ["shift-a", "avg"])
def test_effective_robustness_plot(summary, shift, tmp_path):
    path = plot_effective_robustness(summary, shift, tmp_path / "sub" / f"{shift}.png")
    _check_png(path, min_size=(900, 550))


def test_effective_robustness_plot_refuses_mismatch(summary, tmp_path):
    with pytest.raises(ValueError, match="fitted on logit"):
        plot_effective_robustness(summary, "shift-a", tmp_path / "x.png", transform="probit")
    with pytest.raises(KeyError, match="shift-a"):
        plot_effective_robustness(summary, "shift-z", tmp_path / "x.png")


def _runs():
    rng = np.random.default_rng(0)
    runs = []
    for params in (1e5, 3e5, 1e6):
        for samples in (1e4, 4e4):
            flops = 6 * params * samples
            err = 2.0 * flops**-0.08 * np.exp(rng.normal(0, 0.02)) + 0.05
            runs.append(
                {
                    "pool": "diverse",
                    "task": "zeroshot",
                    "flops": flops,
                    "samples": samples,
                    "params": params,
                    "accuracy": 1 - err,
                }
            )
    # A second pool the plot must filter out.
    runs.append({**runs[0], "pool": "narrow", "accuracy": 0.01})
    return runs


@pytest.mark.parametrize("irreducible", [False, True])
def test_scaling_plot_from_table(irreducible, tmp_path):
    runs = _runs()
    table = fit_scaling_table(runs, "accuracy", irreducible=irreducible, bootstrap=100)
    fit = table["fits"]["zeroshot/diverse/vs_flops"]
    path = plot_scaling(runs, fit, "flops", "accuracy", tmp_path / "scaling.png", bootstrap=100)
    _check_png(path)


def test_scaling_plot_from_fit_object(tmp_path):
    runs = [r for r in _runs() if r["pool"] == "diverse"]
    x = [r["params"] for r in runs]
    fit = fit_power_law(x, [1 - r["accuracy"] for r in runs], bootstrap=100)
    path = plot_scaling(runs, fit, "params", "accuracy", tmp_path / "p.png", bootstrap=100)
    _check_png(path)
