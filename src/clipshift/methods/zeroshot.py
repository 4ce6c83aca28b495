"""Zero-shot classification heads from class-name prompts (Radford et al., 2021).

For each class, every prompt template is filled with the class name and encoded by the text
tower; each embedding is L2-normalised, the class's embeddings are averaged and the mean is
normalised again (the "prompt ensemble"). Normalising before averaging gives every template the
same vote whatever its embedding norm; normalising after puts every class on the unit sphere,
so the head scores cosine similarity. This is what CLIP's notebook and open_clip's
``build_zero_shot_classifier`` compute; the test checks we agree with open_clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipshift.classifier import ImageClassifier, clip_classifier
from clipshift.errors import ConfigError
from clipshift.models import ClipBundle, ClipModel


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts, class-major: all templates of class 0, then class 1, …"""
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ConfigError(f"every template needs a '{{}}' for the class name; bad: {bad}")
    if not classnames:
        raise ConfigError("no class names to build a zero-shot head from")
    return [t.format(c) for c in classnames for t in templates]


@torch.no_grad()
def zeroshot_head(
    model: ClipModel,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Unit-norm class embeddings, shape ``[n_classes, embed_dim]`` (rows = classes).

    ``model`` is an open_clip CLIP (anything with ``encode_text``); prompts are encoded in
    batches of ``batch_size`` texts.
    """
    prompts = fill_templates(classnames, templates)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    model.train(was_training)
    per_prompt = torch.cat(chunks).reshape(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).cpu()


def zeroshot_classifier(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> ImageClassifier:
    """The zero-shot classifier of a CLIP: its vision tower + logit_scale · prompt-ensemble head."""
    device = next(bundle.model.parameters()).device
    head = zeroshot_head(bundle.model, bundle.tokenizer, classnames, templates, device, batch_size)
    return clip_classifier(bundle.model, head).to(device)
