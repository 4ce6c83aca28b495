"""Published CLIP weights as a starting point: ``pretrain.pretrained``.

A value is either an open_clip pretrained tag of ``pretrain.model`` (one of
``open_clip.list_pretrained_tags_by_model(model)``, e.g. ``laion2b_s34b_b79k`` for
``ViT-B-32``) or a Hugging Face Hub id ``hf-hub:org/name`` of a repository in open_clip's
layout (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``). Both are resolved by open_clip's own functions, which go
through ``huggingface_hub`` and its cache: ``HF_HOME`` / ``HF_HUB_CACHE`` say where the cache
is, ``HF_HUB_OFFLINE=1`` forbids any download. A file missing from the cache is an error naming
the value, the cache folder and the fix, never a silently random model (open_clip itself only
warns when a hub repository's weights cannot be fetched).

huggingface_hub reads those variables once, when it is first imported; this module reads them
again at each call, so a stage run in a long-lived process (a Prefect worker, a test) follows
the environment it runs in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipshift.config import HF_PREFIX, check_pretrained, hub_id
from clipshift.errors import ConfigError, DataError

CONFIG_FILE = "open_clip_config.json"


@dataclass(frozen=True)
class PublishedWeights:
    """A resolved ``pretrain.pretrained``: where its weights are and what they are."""

    pretrained: str  # the value as given: a tag or hf-hub:org/name
    architecture: str  # the name the checkpoint and its <name>.json are saved under
    config: dict[str, Any]  # open_clip model config (model_cfg)
    weights: Path  # the weights file in the Hugging Face cache
    sha256: str  # of that file

    @property
    def hub_id(self) -> str | None:
        return hub_id(self.pretrained)

    def record(self) -> dict[str, str]:
        """What a checkpoint, a metrics file and MLflow say about the starting weights."""
        return {
            "pretrained": self.pretrained,
            "pretrained_architecture": self.architecture,
            "pretrained_sha256": self.sha256,
            "pretrained_file": self.weights.name,
        }


# --------------------------------------------------------------------------------------------
# the Hugging Face cache, as the environment says now


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use with the current environment (its precedence:
    HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _follow_environment() -> None:
    """Make huggingface_hub honour HF_HUB_OFFLINE as set now (it read it at import)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = hub_offline()


def _missing(value: str, repo: str, what: str, error: Exception) -> DataError:
    """The error for a file of hub repository ``repo`` that is neither cached nor fetchable."""
    cache = hub_cache_dir()
    folder = f"models--{repo.replace('/', '--')}"
    if hub_offline():
        how = (
            "HF_HUB_OFFLINE=1 forbids downloading it. Run once online (without HF_HUB_OFFLINE) "
            f"to fill the cache, or set HF_HOME to the folder whose hub/ holds {folder} "
            "(HF_HUB_CACHE to that hub folder itself)"
        )
    else:
        how = (
            "check the network and the name, or fill the cache on a machine that is online "
            f"and set HF_HOME to the folder whose hub/ holds {folder}"
        )
    return DataError(
        f"pretrain.pretrained '{value}': cannot load {what} (hub repository {repo}): not in "
        f"the Hugging Face cache {cache}, and not fetched; {how}. "
        f"({type(error).__name__}: {error})"
    )


# --------------------------------------------------------------------------------------------
# resolving and loading


def _tag_weights(tag_cfg: dict[str, Any], cache: Path) -> Path:
    from open_clip.pretrained import download_pretrained

    found = download_pretrained(tag_cfg, cache_dir=str(cache))
    if not found:  # a registry entry with neither url nor hub id
        raise FileNotFoundError("open_clip's registry entry names no file")
    return Path(found)


def _hub_file(repo: str, cache: Path, filename: str | None = None) -> Path:
    from open_clip.pretrained import download_pretrained_from_hf

    return Path(download_pretrained_from_hf(repo, filename=filename, cache_dir=str(cache)))


def _hub_config(value: str, repo: str, cache: Path) -> dict[str, Any]:
    try:
        path = _hub_file(repo, cache, CONFIG_FILE)
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available"
        raise _missing(value, repo, CONFIG_FILE, exc) from exc
    config = json.loads(path.read_text())
    if "model_cfg" not in config:
        raise DataError(
            f"pretrain.pretrained '{value}': {path} has no model_cfg; it is not an open_clip "
            "model repository (open_clip_config.json holds model_cfg and preprocess_cfg)"
        )
    return config


def hub_architecture_name(repo: str) -> str:
    """The name a hub model's architecture is saved under (``<name>.json`` beside the
    checkpoint): the repository id with '/' as '--', a plain file name."""
    return repo.replace("/", "--")


def _close(given: Any, expected: tuple[float, ...]) -> bool:
    values = tuple(given)
    pairs = zip(values, expected, strict=False)
    return len(values) == len(expected) and all(abs(a - b) <= 1e-6 for a, b in pairs)


def _check_normalisation(value: str, preprocess: dict[str, Any]) -> None:
    """clipshift feeds every model images normalised with OpenAI's mean/std (data.loaders);
    a model published with other statistics would be scored on inputs it never saw."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    for key, expected in (("mean", OPENAI_DATASET_MEAN), ("std", OPENAI_DATASET_STD)):
        given = preprocess.get(key)
        if given is not None and not _close(given, expected):
            raise ConfigError(
                f"pretrain.pretrained '{value}' expects images normalised with {key} "
                f"{tuple(given)}, but clipshift normalises every image with OpenAI's "
                f"{key} {tuple(expected)}; choose a model published with OpenAI's statistics"
            )


def resolve(model: str, pretrained: str) -> PublishedWeights:
    """Find (or, online, download) the weights of ``pretrained`` in the Hugging Face cache."""
    from clipshift.data.shards import sha256_file
    from clipshift.models import resolve_model_config

    _follow_environment()
    cache = hub_cache_dir()
    repo = hub_id(pretrained)
    if repo is None:
        try:
            check_pretrained(model, pretrained)
        except ValueError as exc:
            raise ConfigError(f"pretrain.pretrained: {exc}") from None
        from open_clip.pretrained import get_pretrained_cfg

        tag_cfg = get_pretrained_cfg(model, pretrained)
        _check_normalisation(pretrained, tag_cfg)
        name, config = resolve_model_config(model)
        where = tag_cfg.get("hf_hub", "").rstrip("/") or tag_cfg.get("url", "")
        try:
            weights = _tag_weights(tag_cfg, cache)
        except Exception as exc:
            raise _missing(pretrained, where, f"{model}'s weights", exc) from exc
    else:
        hub = _hub_config(pretrained, repo, cache)
        _check_normalisation(pretrained, hub.get("preprocess_cfg", {}))
        name, config = hub_architecture_name(repo), hub["model_cfg"]
        try:
            weights = _hub_file(repo, cache)
        except Exception as exc:
            raise _missing(pretrained, repo, "its weights file", exc) from exc
    return PublishedWeights(pretrained, name, config, weights, sha256_file(weights))


def load(published: PublishedWeights, model: str) -> Any:
    """The published model as a :class:`clipshift.models.ClipBundle`, created by open_clip
    from the tag (``create_model_and_transforms(model, pretrained=tag)``) or the hub id
    (``create_model_and_transforms('hf-hub:org/name')``), from the cache ``resolve`` filled."""
    import open_clip

    from clipshift.models import ClipBundle, register_model_config

    _follow_environment()
    cache = str(hub_cache_dir())
    repo = published.hub_id
    source = model if repo is None else f"{HF_PREFIX}{repo}"
    tag = published.pretrained if repo is None else None
    created, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
        source, pretrained=tag, cache_dir=cache, weights_only=True
    )
    # the checkpoint pretrain writes names this architecture; later stages create it by name
    register_model_config(published.architecture, published.config)
    return ClipBundle(
        model=created,
        name=published.architecture,
        config=dict(published.config),
        preprocess_train=preprocess_train,
        preprocess_eval=preprocess_eval,
        tokenizer=open_clip.get_tokenizer(published.architecture),
    )
