"""Build the emoji world: choose the task, plan every sample, render and write the datasets.

Every random choice is drawn from a generator seeded by ``derive_seed(seed, dataset, index)``,
so each image is a pure function of its own seed (the build is reproducible byte for byte and
could be split across processes in any way), and no two datasets ever share an image seed.

The two pretraining pools share their *content* stream: sample ``i`` of ``pool-diverse`` and of
``pool-narrow`` shows the same emoji with a caption drawn from the same generator; only the
style (and the augmentation seed) differs. The pools thus differ in their image distribution
and nothing else, which is the comparison the data-centric experiment needs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipshift.config import FetchConfig, WorldConfig
from clipshift.data.shards import INFO_FILE, DatasetInfo, ShardWriter
from clipshift.data.world.art import DERIVED_STYLES, ArtLibrary, base_style, family_of
from clipshift.data.world.captions import EmojiMeta, load_catalog, make_caption
from clipshift.data.world.card import write_card
from clipshift.data.world.render import render
from clipshift.data.world.seeding import derive_seed, rng_for, styles_in_use
from clipshift.errors import DataError
from clipshift.tracking_api import NullTracker, Tracker

SOURCE_NAME = "clipshift-world"
# Subcategories whose members differ mostly by a letter, a digit, an arrow's direction or a
# colour: hard to tell apart at 32 px and identical as silhouettes. Not used as task classes.
CONFUSABLE_SUBCATEGORIES = frozenset(
    "alphanum arrow av-symbol currency gender geometric keycap math other-symbol punctuation "
    "religion zodiac time transport-sign warning flag country-flag subdivision-flag skin-tone "
    "hair-style family person-symbol".split()
)
CONFUSABLE_WORDS = frozenset({"button", "sign", "symbol", "mark"})
# Words that do not make two emoji variants of one thing ('drooling face', 'cup with straw').
GENERIC_WORDS = frozenset("face with of and in on the at behind".split())
# At most this many task classes per group, so the task is not fifty faces.
GROUP_CAPS = {"face": 4, "hand": 2, "person": 3, "heart": 1}
DEFAULT_GROUP_CAP = 3
DERIVED_INFO = {
    "silhouette": "alpha mask of the reference art filled with one dark colour",
    "grayscale": "reference style rendered without colour",
    "corrupt": "reference style with a random CIFAR-10-C-like corruption per image",
}


def base_styles(world: WorldConfig) -> list[str]:
    return sorted({base_style(s, world.reference_style) for s in styles_in_use(world)})


# --------------------------------------------------------------------------------------------
# the universe and the task


def emoji_universe(lib: ArtLibrary, catalog: dict[str, EmojiMeta], styles: list[str]) -> list[str]:
    """Keys of the emoji that every style in use can draw, in codepoint order."""
    keys = set(catalog)
    for style in styles:
        keys &= lib.keys(style)
    return sorted(keys)


def class_group(meta: EmojiMeta) -> str:
    sub = meta.subcategory
    if sub.startswith("face-"):
        return "face"
    if sub.startswith("hand") or sub == "hands":
        return "hand"
    if sub.startswith("person"):
        return "person"
    return sub or "uncategorised"


def _eligible(meta: EmojiMeta) -> bool:
    words = set(meta.name.replace("-", " ").split())
    return (
        bool(meta.category)
        and meta.subcategory not in CONFUSABLE_SUBCATEGORIES
        and not words & CONFUSABLE_WORDS
        and not any(c.isdigit() for c in meta.name)
    )


def _content_words(name: str) -> set[str]:
    """'globe showing americas' and 'globe showing asia' share 'globe': variants of one thing."""
    return set(name.replace("-", " ").split()) - GENERIC_WORDS


def _clash(words: set[str], used: set[str]) -> bool:
    """Shared words, or one containing the other ('locked' / 'unlocked')."""
    return any(
        w == u or (min(len(w), len(u)) >= 4 and (w in u or u in w)) for w in words for u in used
    )


def select_classes(
    universe: list[str], catalog: dict[str, EmojiMeta], num_classes: int, seed: int
) -> list[str]:
    """Pick ``num_classes`` distinct, nameable emoji, spread over subcategories (seeded).

    Groups (subcategories, with all faces, hands and persons pooled) are visited round-robin in
    a seeded order, taking one member per visit up to the group's cap and skipping emoji that
    share a word with a chosen class (variants of one thing: moon phases, globes, cat faces,
    locks). Within a group members are in seeded order, short names (at most three words)
    first. Returns keys sorted by name.
    """
    if num_classes > len(universe):
        raise DataError(
            f"fetch.world.num_classes={num_classes} but only {len(universe)} emoji exist in "
            "every style in use; lower num_classes or use fewer styles"
        )
    rng = rng_for(seed, "classes")
    groups: dict[str, list[str]] = {}
    for key in universe:
        if _eligible(catalog[key]):
            groups.setdefault(class_group(catalog[key]), []).append(key)
    for name, members in groups.items():
        order = [members[i] for i in rng.permutation(len(members))]
        groups[name] = sorted(order, key=lambda k: len(catalog[k].name.split()) > 3)
    order = [sorted(groups)[i] for i in rng.permutation(len(groups))]
    chosen: list[str] = []
    taken = dict.fromkeys(order, 0)
    used_words: set[str] = set()
    progress = True
    while progress and len(chosen) < num_classes:
        progress = False
        for group in order:
            full = taken[group] >= GROUP_CAPS.get(group, DEFAULT_GROUP_CAP)
            if full or len(chosen) >= num_classes:
                continue
            queue = groups[group]
            while queue:
                key = queue.pop(0)
                words = _content_words(catalog[key].name)
                if not _clash(words, used_words):
                    chosen.append(key)
                    used_words |= words
                    taken[group] += 1
                    progress = True
                    break
    if len(chosen) < num_classes:  # more classes than distinct-looking emoji: take the rest
        picked = set(chosen)
        rest = [k for k in universe if k not in picked]
        chosen += [rest[i] for i in rng.permutation(len(rest))[: num_classes - len(chosen)]]
    return sorted(chosen, key=lambda k: catalog[k].name)


# --------------------------------------------------------------------------------------------
# the plan: what every sample is, before any pixel is drawn


@dataclass(frozen=True)
class SampleSpec:
    dataset: str
    index: int
    key: str  # emoji key
    style: str
    seed: int  # the image's own seed
    label: int | None = None
    caption: str | None = None
    caption_kind: str | None = None


@dataclass(frozen=True)
class DatasetPlan:
    name: str
    role: str
    styles: list[str]
    samples: list[SampleSpec]
    labelled: bool


def labelled_plan(
    name: str, role: str, style: str, classes: list[str], per_class: int, seed: int
) -> DatasetPlan:
    # round-robin over classes, so every shard holds every class
    samples = [
        SampleSpec(
            name,
            i,
            classes[i % len(classes)],
            style,
            derive_seed(seed, name, i),
            label=i % len(classes),
        )
        for i in range(per_class * len(classes))
    ]
    return DatasetPlan(name, role, [style], samples, labelled=True)


def _cycled(universe: list[str], seed: int, stream: str, count: int) -> Iterator[str]:
    """Each emoji once per pass, in a fresh seeded order every pass: balanced coverage."""
    for start in range(0, count, len(universe)):
        perm = rng_for(seed, stream, start // len(universe)).permutation(len(universe))
        yield from (universe[j] for j in perm[: count - start])


# A drawing is one artist's design of one emoji: (emoji key, style family). Re-renders of a
# drawing (other augmentation, a derived style, a sibling style of the family) are the same
# drawing, so a pool holding it would have seen the evaluation image.
Drawing = tuple[str, str]


def drawing_id(key: str, family: str) -> str:
    """How a sample's json names its drawing; validate compares these across datasets."""
    return f"{key}:{family}"


def caption_plan(
    name: str,
    role: str,
    styles: list[str],
    universe: list[str],
    catalog: dict[str, EmojiMeta],
    count: int,
    noise: float,
    seed: int,
    content: str,
    drawable: dict[str, list[str]] | None = None,
) -> DatasetPlan:
    """Image-caption pairs; ``content`` names the stream of emoji and caption draws.

    ``drawable`` maps an emoji to the styles it may be drawn in here (default: all
    ``styles``); the pools use it to leave out every drawing an evaluation set shows.
    """
    names = [catalog[k].name for k in universe]
    samples = []
    for i, key in enumerate(_cycled(universe, seed, f"{content}-emoji", count)):
        image_seed = derive_seed(seed, name, i)
        allowed = drawable[key] if drawable is not None else styles
        style = allowed[int(rng_for(image_seed, "style").integers(len(allowed)))]
        caption_rng = rng_for(seed, f"{content}-caption", i)
        text, kind = make_caption(catalog[key], style, caption_rng, noise, names)
        samples.append(SampleSpec(name, i, key, style, image_seed, caption=text, caption_kind=kind))
    return DatasetPlan(name, role, list(styles), samples, labelled=False)


def pool_universe(
    universe: list[str], classes: list[str], size: int | None, seed: int
) -> list[str]:
    """The emoji the pools draw from: every task class, then a seeded sample of the others.

    A smaller universe gives each concept more pretraining samples (as web data covers common
    concepts many times); the task classes are always in it, so zero-shot is well-posed.
    """
    if size is None or size >= len(universe):
        return universe
    chosen = set(classes)
    others = [k for k in universe if k not in chosen]
    order = rng_for(seed, "pool-universe").permutation(len(others))
    chosen |= {others[i] for i in order[: size - len(classes)]}
    return [k for k in universe if k in chosen]


def eval_drawings(world: WorldConfig, classes: list[str]) -> set[Drawing]:
    """Drawings the labelled sets show: every task class in every evaluated style's family."""
    styles = [world.reference_style, *world.shift_styles]
    families = {family_of(s, world.reference_style) for s in styles}
    return {(key, family) for key in classes for family in families}


def retrieval_drawings(
    world: WorldConfig, universe: list[str], classes: list[str], seed: int
) -> dict[str, str]:
    """One held-out drawing per non-task pool emoji (emoji -> style) for the retrieval set.

    The pools keep that emoji in the other styles and that style on other emoji, so retrieval
    measures transfer to unseen drawings, as the shifts do.
    """
    styles = list(dict.fromkeys(world.diverse_styles))
    task = set(classes)
    held: dict[str, str] = {}
    for key in universe:
        if key not in task:
            pick = rng_for(seed, "retrieval-drawing", key).integers(len(styles))
            held[key] = styles[int(pick)]
    return held


def pool_styles(
    name: str, styles: list[str], universe: list[str], held_out: set[Drawing], reference: str
) -> dict[str, list[str]]:
    """Per emoji, the pool's styles whose drawing of it no evaluation set shows."""
    drawable = {
        key: [s for s in styles if (key, family_of(s, reference)) not in held_out]
        for key in universe
    }
    missing = sorted(k for k, allowed in drawable.items() if not allowed)
    if missing:
        raise DataError(
            f"pool '{name}' cannot draw {len(missing)} emoji (e.g. {missing[:3]}) without "
            f"showing a drawing an evaluation set holds: every style of {styles} belongs to a "
            "family that the reference or a shift uses for the task classes. Fix: add to "
            "fetch.world's pool styles one whose family no evaluation set uses (emojione, "
            "emojione_v1, fxemoji)"
        )
    return drawable


def shift_group(style: str, world: WorldConfig) -> str:
    """natural-covered (a pool has the style, on other emoji), natural-unseen, or synthetic."""
    if style in DERIVED_STYLES:
        return "synthetic"
    pooled = {*world.diverse_styles, *world.narrow_styles}
    return "natural-covered" if style in pooled else "natural-unseen"


def world_plan(
    world: WorldConfig,
    seed: int,
    classes: list[str],
    universe: list[str],
    catalog: dict[str, EmojiMeta],
) -> list[DatasetPlan]:
    ref = world.reference_style
    universe = pool_universe(universe, classes, world.pool_universe, seed)
    plans = [
        labelled_plan("train", "train", ref, classes, world.train_per_class, seed),
        labelled_plan("val", "val", ref, classes, world.val_per_class, seed),
        labelled_plan("test", "test", ref, classes, world.test_per_class, seed),
    ]
    plans += [
        labelled_plan(f"shift-{s}", "shift", s, classes, world.shift_per_class, seed)
        for s in world.shift_styles
    ]
    retrieval = retrieval_drawings(world, universe, classes, seed)
    held_out = eval_drawings(world, classes)
    held_out |= {(key, family_of(style, ref)) for key, style in retrieval.items()}
    for pool, styles in (("diverse", world.diverse_styles), ("narrow", world.narrow_styles)):
        name = f"pool-{pool}"
        unique: list[str] = list(dict.fromkeys(styles))
        plans.append(
            caption_plan(
                name,
                "pool",
                unique,
                universe,
                catalog,
                world.pool_size,
                world.caption_noise,
                seed,
                "pool",
                drawable=pool_styles(name, unique, universe, held_out, ref),
            )
        )
    # retrieval: clean captions (noise would blur the metric), its own content stream, and
    # only drawings no pool holds
    retrieval_universe = sorted(retrieval)
    plans.append(
        caption_plan(
            "retrieval",
            "retrieval",
            sorted(set(retrieval.values())),
            retrieval_universe,
            catalog,
            world.retrieval_size,
            0.0,
            seed,
            "retrieval",
            drawable={key: [style] for key, style in retrieval.items()},
        )
    )
    return plans


# --------------------------------------------------------------------------------------------
# rendering and writing


class Renderer:
    """Draws planned samples; the art library supplies (and caches) each style's rasters."""

    def __init__(self, lib: ArtLibrary, world: WorldConfig, catalog: dict[str, EmojiMeta]):
        self.lib, self.world, self.catalog = lib, world, catalog

    def image(self, key: str, style: str, seed: int) -> tuple[Image.Image, dict[str, Any]]:
        art = self.lib.art(base_style(style, self.world.reference_style), key)
        if art is None:
            raise DataError(
                f"the {style} art for emoji {key} is empty; drop '{style}' from fetch.world "
                "or report this emoji as a bug"
            )
        return render(art, style, self.world.image_size, np.random.default_rng(seed))

    def sample(self, spec: SampleSpec, classes: list[str]) -> dict[str, Any]:
        meta = self.catalog[spec.key]
        image, augment = self.image(spec.key, spec.style, spec.seed)
        info = {
            "emoji": meta.char,
            "codepoint": spec.key,
            "name": meta.name,
            "category": meta.category,
            "subcategory": meta.subcategory,
            "style": spec.style,
            "drawing": drawing_id(spec.key, family_of(spec.style, self.world.reference_style)),
            "split": spec.dataset,
            "index": spec.index,
            "seed": spec.seed,
            "augment": augment,
        }
        sample: dict[str, Any] = {"__key__": f"{spec.dataset}-{spec.index:07d}", "png": image}
        if spec.label is not None:
            sample["cls"] = spec.label
            sample["txt"] = classes[spec.label]
        else:
            sample["txt"] = spec.caption
            info["caption_kind"] = spec.caption_kind
        sample["json"] = info
        return sample


def write_plan(
    plan: DatasetPlan,
    renderer: Renderer,
    out_dir: Path,
    classes: list[str],
    world: WorldConfig,
    seed: int,
    progress: bool,
) -> DatasetInfo:
    info = DatasetInfo(
        name=plan.name,
        role=plan.role,
        num_samples=0,
        classes=classes if plan.labelled else None,
        styles=plan.styles,
        source=SOURCE_NAME,
        image_size=world.image_size,
        extra={
            "seed": seed,
            "generator": "clipshift.data.world",
            "emoji": len({s.key for s in plan.samples}),
        }
        | ({"shift_group": shift_group(plan.styles[0], world)} if plan.role == "shift" else {}),
    )
    with ShardWriter(out_dir / plan.name, info, shard_size=world.shard_size) as writer:
        for spec in tqdm(plan.samples, desc=plan.name, disable=not progress, leave=False):
            writer.write(renderer.sample(spec, classes))
    return writer.info


def remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete world datasets a previous config made that this one does not (e.g. old shifts)."""
    if not out_dir.exists():
        return
    for child in out_dir.iterdir():
        info = child / INFO_FILE
        if child.is_dir() and child.name not in keep and info.exists():
            try:
                source = json.loads(info.read_text()).get("source")
            except ValueError:
                continue
            if source == SOURCE_NAME:
                shutil.rmtree(child)


def style_infos(lib: ArtLibrary, world: WorldConfig) -> dict[str, dict[str, str]]:
    out = {}
    for style in styles_in_use(world):
        base = base_style(style, world.reference_style)
        info = dict(lib.info(base))
        if style in DERIVED_STYLES:
            info["artist"] = f"{info['artist']} (derived: {DERIVED_INFO[style]})"
            info["derived_from"] = base
        out[style] = info
    return dict(sorted(out.items()))


def build_world(
    cfg: FetchConfig, out_dir: Path, tracker: Tracker | None = None, progress: bool = True
) -> dict[str, Any]:
    """Render the built-in world into ``out_dir``; return its part of the fetch manifest.

    The returned ``build_seconds`` is a fact of this run for metrics, not manifest content:
    everything written into ``out_dir`` is a pure function of the configuration."""
    start = time.perf_counter()
    tracker = tracker or NullTracker()
    world, seed, out_dir = cfg.world, cfg.seed, Path(out_dir)
    lib = ArtLibrary(base_styles(world), cfg.cache_dir, art_px=max(64, 2 * world.image_size))
    catalog = load_catalog()
    universe = emoji_universe(lib, catalog, base_styles(world))
    classes_keys = select_classes(universe, catalog, world.num_classes, seed)
    classes = [catalog[k].name for k in classes_keys]
    plans = world_plan(world, seed, classes_keys, universe, catalog)
    renderer = Renderer(lib, world, catalog)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, {p.name for p in plans} | {"card"})
    datasets = {}
    for plan in tqdm(plans, desc="emoji world", disable=not progress):
        datasets[plan.name] = write_plan(plan, renderer, out_dir, classes, world, seed, progress)
    result: dict[str, Any] = {
        "task": {
            "classes": classes,
            "codepoints": classes_keys,
            "emoji": [catalog[k].char for k in classes_keys],
            "reference_style": world.reference_style,
            "shift_styles": list(world.shift_styles),
            "universe_size": len(universe),
            "pool_universe_size": len(
                pool_universe(universe, classes_keys, world.pool_universe, seed)
            ),
        },
        "datasets": {name: info.model_dump() for name, info in datasets.items()},
        "styles": style_infos(lib, world),
    }
    card_files = write_card(out_dir / "card", result, cfg, renderer)
    lib.save_cache()
    result["build_seconds"] = round(time.perf_counter() - start, 2)
    tracker.log_metrics(
        {f"world_{name}_samples": float(info.num_samples) for name, info in datasets.items()}
        | {"world_build_seconds": result["build_seconds"], "world_universe": float(len(universe))}
    )
    for path in card_files:
        tracker.log_artifact(path, "world_card")
    return result
