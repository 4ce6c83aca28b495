"""Which architecture a benchmark measures, and how each side learns it.

No benchmark names an architecture itself. One that loads a checkpoint takes the architecture
the checkpoint records (clipshift checkpoints carry ``name`` and ``model_config``); one that
trains takes ``--model``, by default the project's default pretraining model
(``PretrainConfig().model``, what params.yaml trains). A hard-coded name went stale once: the
default moved to patch 8, and loading the pipeline's checkpoint into the old name failed.

Each side resolves the architecture in its own process (ours through clipshift, the peer
through open_clip's registry), so the parent process never imports torch for it.

Standard library only at import: the peer side imports this module inside the peer venv,
which has torch and open_clip but not clipshift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import common as C


def default_model() -> str:
    """The project's default pretraining architecture (imports no torch)."""
    from clipshift.config import PretrainConfig

    return PretrainConfig().model


def peer_model(model: str) -> str:
    """In the peer's process: make ``model`` known to open_clip the way clipshift resolves
    it (an open_clip name, one of clipshift's shipped configs, or a config JSON path whose
    stem is the name); return the name to pass the peer."""
    import open_clip

    open_clip.add_model_config(str(C.MODEL_CONFIGS))
    if model.endswith(".json"):
        open_clip.add_model_config(model)  # registered under the file's stem, as clipshift does
        return Path(model).stem
    return model


def checkpoint_arch(path: Path) -> tuple[str, dict[str, Any]]:
    """(name, config) recorded in a clipshift checkpoint (torch only: runs in either venv)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in ("name", "model_config") if key not in state]
    if missing:
        raise SystemExit(
            f"checkpoint {path} lacks {missing}: not written by clipshift pretrain, so its "
            "architecture is unknown; re-run `dvc repro pretrain` or give another --checkpoint"
        )
    return state["name"], state["model_config"]


def peer_checkpoint_model(path: Path, config_dir: Path) -> str:
    """In the peer's process: register the architecture recorded in checkpoint ``path``
    with open_clip (as ``<config_dir>/<name>.json``, the file layout it reads); return its
    name, which the peer then loads ``path`` into."""
    import open_clip

    name, config = checkpoint_arch(path)
    if "/" in name:
        raise SystemExit(f"{path}: model name {name!r} cannot name a config file")
    config_dir.mkdir(parents=True, exist_ok=True)
    config_file = config_dir / f"{name}.json"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    open_clip.add_model_config(str(config_file))
    return name
