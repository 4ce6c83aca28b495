"""Analytic FLOPs and parameter counts against open_clip itself and torch's FLOP counter."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipshift.errors import ConfigError
from clipshift.flops import (
    clip_flops_per_sample,
    count_params,
    count_params_non_embedding,
    training_flops,
)

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
}
# Non-default knobs that change the counts: mlp_ratio, a text projection bias, a logit bias.
ODD = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 96, "layers": 3, "mlp_ratio": 2.0},
    "text_cfg": {
        "context_length": 20,
        "vocab_size": 300,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "proj_bias": True,
    },
    "init_logit_bias": -10.0,
}


def test_count_params_matches_create_model(tmp_path):
    (tmp_path / "clipshift-test-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "clipshift-test-tiny.json")
    model = open_clip.create_model("clipshift-test-tiny", device="cpu")
    actual = sum(p.numel() for p in model.parameters())
    assert abs(count_params(TINY) - actual) <= 0.02 * actual
    assert count_params(TINY) == actual  # in fact exact


def test_non_embedding_params_leave_out_the_token_table_only(tmp_path):
    """Hand count on a real open_clip model: every parameter but token_embedding.weight."""
    (tmp_path / "clipshift-test-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "clipshift-test-tiny.json")
    model = open_clip.create_model("clipshift-test-tiny", device="cpu")
    by_name = dict(model.named_parameters())
    table = by_name["token_embedding.weight"]
    assert table.shape == (100, 64)  # vocab_size × text width
    hand = sum(p.numel() for n, p in by_name.items() if n != "token_embedding.weight")
    assert count_params_non_embedding(TINY) == hand
    assert count_params(TINY) - count_params_non_embedding(TINY) == 6400
    # at the real vocabulary the table is most of a tiny CLIP: the reason for the measure
    big = {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 49408}}
    assert count_params_non_embedding(big) < 0.2 * count_params(big)


def test_count_params_odd_config():
    model = open_clip.model.CLIP(**ODD)
    assert count_params(ODD) == sum(p.numel() for p in model.parameters())


def _measured(cfg: dict) -> tuple[float, float]:
    """Forward FLOPs per sample of each tower, as torch's FlopCounterMode sees them."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval()
    batch = 2
    size = cfg["vision_cfg"]["image_size"]
    image = torch.randn(batch, 3, size, size)
    text = torch.randint(
        0, cfg["text_cfg"]["vocab_size"], (batch, cfg["text_cfg"]["context_length"])
    )
    counts = []
    # The fused CPU attention kernel has no FLOP formula registered; the math backend
    # decomposes attention into counted bmm calls.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        for encode, arg in [(model.encode_image, image), (model.encode_text, text)]:
            counter = FlopCounterMode(display=False)
            with counter:
                encode(arg)
            counts.append(counter.get_total_flops() / batch)
    return counts[0], counts[1]


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
def test_flops_match_flop_counter(cfg):
    image, text = _measured(cfg)
    ours = clip_flops_per_sample(cfg)
    assert ours["image"] == pytest.approx(image, rel=0.02)
    assert ours["text"] == pytest.approx(text, rel=0.02)
    assert ours["total"] == pytest.approx(ours["image"] + ours["text"])


def test_vit_b32_published_numbers():
    # open_clip's own table: ViT-B-32 has 151.28 M params and 4.41 image GMACs (8.82 GFLOPs).
    path = Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json"
    cfg = json.loads(path.read_text())
    assert count_params(cfg) == 151_277_313
    assert clip_flops_per_sample(cfg)["image"] / 1e9 == pytest.approx(8.82, abs=0.01)


def test_training_flops_convention():
    assert training_flops(TINY, 1000) == pytest.approx(
        3 * 1000 * clip_flops_per_sample(TINY)["total"]
    )


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"embed_dim": 8, "vision_cfg": {"layers": [1, 1, 1, 1]}, "text_cfg": {}}, "ResNet"),
        (
            {"embed_dim": 8, "vision_cfg": {"timm_model_name": "x"}, "text_cfg": {}},
            "timm_model_name",
        ),
        ({"vision_cfg": {}, "text_cfg": {}}, "embed_dim"),
    ],
)
def test_unsupported_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        count_params(cfg)
