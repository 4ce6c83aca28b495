"""Analytic compute and size of an open_clip ViT CLIP, from its JSON config dict.

Convention (as in Kaplan et al. 2020 and Cherti et al. 2023): one multiply-add is 2 FLOPs;
we count the matrix products (patch embedding, Q/K/V and output projections, the two
attention products QK^T and AV, the MLP, the final projections) and ignore element-wise work
(LayerNorm, softmax, GELU, residual adds, biases), which is a few percent at most. Text
attention is counted over the full context (CLIP pads every caption to ``context_length`` and
masks, so the causal mask saves no work in practice). The B×B contrastive logit matrix is left
out: it depends on the batch size and is negligible per pair. Patch dropout is ignored.

Training FLOPs = 3 × forward FLOPs (the backward pass costs about twice the forward) × samples
seen: :func:`training_flops`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from clipshift.errors import ConfigError

log = logging.getLogger(__name__)

_UNSUPPORTED_VISION = ("timm_model_name", "attentional_pool")
_UNSUPPORTED_TEXT = ("hf_model_name", "embed_cls")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _check(model_cfg: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The two tower configs, after refusing the variants this counter does not model."""
    try:
        vision, text, _ = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    except KeyError as err:
        raise ConfigError(
            f"model config lacks {err}; give an open_clip CLIP config with embed_dim, "
            "vision_cfg and text_cfg"
        ) from None
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise ConfigError(
            "FLOPs/params counting supports ViT towers only, not ResNet (layers is a list)"
        )
    bad = [k for k in _UNSUPPORTED_VISION if vision.get(k)] + [
        k for k in _UNSUPPORTED_TEXT if text.get(k)
    ]
    if bad:
        raise ConfigError(
            f"FLOPs/params counting does not model {bad}; use a plain ViT CLIP config"
        )
    return vision, text


def _tower_dims(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[int, int, int]:
    """(width, layers, mlp hidden width) of one transformer tower."""
    width = int(cfg.get("width", defaults["width"]))
    layers = int(cfg.get("layers", defaults["layers"]))
    hidden = int(width * float(cfg.get("mlp_ratio", 4.0)))
    return width, layers, hidden


def _transformer_macs(tokens: int, width: int, layers: int, hidden: int) -> int:
    """Multiply-adds of one forward pass through ``layers`` pre-LN transformer blocks."""
    projections = tokens * width * (3 * width + width)  # Q, K, V in one matmul + output proj
    attention = 2 * tokens * tokens * width  # QK^T and attention-weighted V, all heads
    mlp = 2 * tokens * width * hidden
    return layers * (projections + attention + mlp)


def _vision_tokens(vision: Mapping[str, Any]) -> tuple[int, int]:
    """(number of patches, patch area) — the class token comes on top of the patches."""
    height, width = _pair(vision.get("image_size", 224))
    ph, pw = _pair(vision.get("patch_size", 16))
    return (height // ph) * (width // pw), ph * pw


def clip_flops_per_sample(model_cfg: Mapping[str, Any]) -> dict[str, float]:
    """Forward FLOPs (2 × multiply-adds) per image-text pair: {"image", "text", "total"}."""
    vision, text = _check(model_cfg)
    embed = int(model_cfg["embed_dim"])
    v_width, v_layers, v_hidden = _tower_dims(vision, {"width": 768, "layers": 12})
    patches, area = _vision_tokens(vision)
    image = patches * 3 * area * v_width  # patch embedding: a strided conv = one matmul
    image += _transformer_macs(patches + 1, v_width, v_layers, v_hidden)
    image += v_width * embed  # projection of the pooled token

    t_width, t_layers, t_hidden = _tower_dims(text, {"width": 512, "layers": 12})
    ctx = int(text.get("context_length", 77))
    text_macs = _transformer_macs(ctx, t_width, t_layers, t_hidden)
    if text.get("proj_type", "linear") != "none":
        text_macs += t_width * embed  # projection of the pooled (EOT) token
    return {"image": 2.0 * image, "text": 2.0 * text_macs, "total": 2.0 * (image + text_macs)}


def training_flops(model_cfg: Mapping[str, Any], samples: int) -> float:
    """Training compute for ``samples`` image-text pairs: 3 × forward (forward + backward)."""
    return 3.0 * clip_flops_per_sample(model_cfg)["total"] * float(samples)


def _block_params(width: int, hidden: int) -> int:
    attn = 3 * width * width + 3 * width + width * width + width  # in_proj + out_proj (+ biases)
    mlp = width * hidden + hidden + hidden * width + width
    return attn + mlp + 4 * width  # two LayerNorms (weight + bias)


def count_params(model_cfg: Mapping[str, Any]) -> int:
    """Number of parameters open_clip creates for this ViT CLIP config (analytic)."""
    vision, text = _check(model_cfg)
    embed = int(model_cfg["embed_dim"])
    v_width, v_layers, v_hidden = _tower_dims(vision, {"width": 768, "layers": 12})
    patches, area = _vision_tokens(vision)
    n = 3 * area * v_width  # patch conv, no bias
    n += v_width + (patches + 1) * v_width  # class token + positional embedding
    n += 0 if vision.get("no_ln_pre") else 2 * v_width  # ln_pre
    n += v_layers * _block_params(v_width, v_hidden)
    n += 2 * v_width + v_width * embed  # ln_post + projection

    t_width, t_layers, t_hidden = _tower_dims(text, {"width": 512, "layers": 12})
    ctx, vocab = int(text.get("context_length", 77)), int(text.get("vocab_size", 49408))
    n += vocab * t_width + ctx * t_width  # token + positional embedding
    n += t_layers * _block_params(t_width, t_hidden)
    n += 2 * t_width  # ln_final
    if text.get("proj_type", "linear") != "none":
        n += t_width * embed + (embed if text.get("proj_bias") else 0)
    n += 1  # logit_scale
    n += 1 if model_cfg.get("init_logit_bias") is not None else 0
    return int(n)


def token_embedding_params(model_cfg: Mapping[str, Any]) -> int:
    """Rows of the text tower's token-embedding table (vocab_size × text width)."""
    _, text = _check(model_cfg)
    t_width, _, _ = _tower_dims(text, {"width": 512, "layers": 12})
    return int(text.get("vocab_size", 49408)) * t_width


def count_params_non_embedding(model_cfg: Mapping[str, Any]) -> int:
    """Parameters without the text token-embedding table, the size measure of scaling laws
    (Kaplan et al. 2020 count non-embedding parameters). In a tiny CLIP with a 49 408-token
    vocabulary that table is most of the model, and it costs no compute: a lookup, not a
    matmul. Positional embeddings stay in (they are tiny and used at every position)."""
    return count_params(model_cfg) - token_embedding_params(model_cfg)


def flops_metrics(model_config: dict[str, Any], samples: int) -> dict[str, float]:
    """FLOPs per sample and of a whole training run (3× forward), or {} for an architecture
    the analytic count does not cover."""
    try:
        per_sample = clip_flops_per_sample(model_config)["total"]
    except (ConfigError, KeyError, AttributeError) as exc:
        log.info("no FLOPs count for this model: %s", exc)
        return {}
    return {"flops_per_sample": per_sample, "train_flops": 3.0 * per_sample * samples}
