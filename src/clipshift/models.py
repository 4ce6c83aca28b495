"""Model architectures: open_clip names, the configs shipped in the repo, and tiny generated ones.

clipshift never defines its own CLIP: every model is an open_clip model, so checkpoints stay
loadable by stock ``open_clip.create_model_and_transforms(name, pretrained=path)``. The JSON
configs in ``model_configs/`` are registered with open_clip on import of this module.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipshift.checkpoints import load_checkpoint
from clipshift.errors import CheckpointError, ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


# open_clip's CLIP / CustomTextCLIP. Their encode_image, encode_text, visual and logit_scale
# are invisible to type checkers through nn.Module.__getattr__, hence Any.
ClipModel = Any


@dataclass
class ClipBundle:
    """An open_clip model with what is needed to feed it."""

    model: torch.nn.Module
    name: str
    config: dict[str, Any]
    preprocess_train: Any
    preprocess_eval: Any
    tokenizer: Any

    @property
    def image_size(self) -> int:
        size = self.config["vision_cfg"]["image_size"]
        return size if isinstance(size, int) else size[0]


def known_model_names() -> list[str]:
    return open_clip.list_models()


def resolve_model_config(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Return (name, config) for an open_clip architecture name or a config JSON path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json"):
        if not path.exists():
            raise ConfigError(
                f"model config file '{name_or_path}' not found; give an existing "
                "JSON path or an open_clip architecture name"
            )
        config = json.loads(path.read_text())
        name = path.stem
        register_model_config(name, config)
        return name, config
    config = open_clip.get_model_config(name_or_path)
    if config is None:
        close = [m for m in known_model_names() if name_or_path.lower()[:5] in m.lower()][:8]
        raise ConfigError(
            f"model '{name_or_path}' is not an open_clip architecture; use one of "
            f"open_clip.list_models() (e.g. {', '.join(close or known_model_names()[:5])}) "
            "or a path to a model config JSON"
        )
    return name_or_path, config


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Make ``name`` known to open_clip in this process (for generated or user configs)."""
    from open_clip import factory  # the registry dict lives here

    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def tiny_vit_config(
    width: int,
    layers: int,
    image_size: int = 32,
    patch_size: int = 4,
    embed_dim: int | None = None,
    text_width: int | None = None,
    text_layers: int | None = None,
    context_length: int = 32,
) -> dict[str, Any]:
    """A small ViT CLIP config; head width 32 so narrow towers still get several heads."""
    text_width = text_width or width
    return {
        "embed_dim": embed_dim or width,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 32,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": max(1, text_width // 32),
            "layers": text_layers or layers,
        },
    }


def tiny_vit_name(width: int, layers: int, image_size: int = 32, patch_size: int = 4) -> str:
    return f"clipshift-vit-w{width}-l{layers}-i{image_size}-p{patch_size}"


def create_clip(
    name_or_path: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
) -> ClipBundle:
    """Create an open_clip model (optionally from a checkpoint file) with its transforms.

    ``config`` registers a generated architecture under ``name_or_path`` first.
    """
    if config is not None:
        register_model_config(name_or_path, config)
        name = name_or_path
    else:
        name, config = resolve_model_config(name_or_path)
    if pretrained is not None and not Path(pretrained).exists():
        raise ConfigError(
            f"checkpoint '{pretrained}' not found; run the stage that writes it or fix the path"
        )
    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, weights_only=True
    )
    return ClipBundle(
        model=model,
        name=name,
        config=copy.deepcopy(config),
        preprocess_train=preprocess_train,
        preprocess_eval=preprocess_eval,
        tokenizer=open_clip.get_tokenizer(name),
    )


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> ClipBundle:
    """A CLIP from a checkpoint written by the pretrain stage (``save_open_clip_checkpoint``)."""
    state = load_checkpoint(path)
    missing = [k for k in ("state_dict", "name", "model_config") if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' lacks {missing}; it was not written by clipshift pretrain — "
            "re-run `dvc repro pretrain`"
        )
    bundle = create_clip(state["name"], device=device, config=state["model_config"])
    bundle.model.load_state_dict(state["state_dict"])
    bundle.model.eval()
    return bundle
