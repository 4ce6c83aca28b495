"""ImageNet's label space without a hand-written map: ``class_map: imagenet``.

Class index i of ImageNet-1k is the i-th of its 1000 WordNet ids in sorted order (the folders
``n01440764`` … of ImageNet val after ``valprep.sh``: torchvision's ImageFolder order), and its
name is open_clip's ``IMAGENET_CLASSNAMES[i]`` (the CLIP paper's cleaned names, which
CLIP_benchmark uses too). Evaluation sets come in two folder layouts, both recognised:

- WordNet-id folders: ImageNet val, ImageNet-Sketch (all 1000), ImageNet-R and -A (200 each);
- ImageNetV2's folders ``0`` … ``999``: the class index itself (by value: ``10`` sorts before
  ``2`` as a string but is class 10).

Two pairs of ImageNet classes share a CLIP name ('missile': 657 and 744; 'sunglasses': 836 and
837), so labels are matched by class index here, never by name. The reference set (the
``role: test`` source) defines the task as the ImageNet classes whose folders it has, in
ImageNet order (all 1000 for ImageNet val); a shift maps its folders onto those, and one that
covers part of them (-R, -A) records the covered task indices as its ``class_subset``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from clipshift.errors import ConfigError, DataError

IMAGENET = "imagenet"
NUM_CLASSES = 1000
WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.json")
# open_clip.zero_shot_metadata's template lists, by the names params.yaml uses
TEMPLATE_SETS = {
    "openai-imagenet": "OPENAI_IMAGENET_TEMPLATES",  # CLIP's 80 prompts
    "simple-imagenet": "SIMPLE_IMAGENET_TEMPLATES",  # the 7 its notebook selected
}
_WNID = re.compile(r"^n\d{8}$")


@cache
def wnids() -> tuple[str, ...]:
    """ImageNet-1k's WordNet ids in class-index order (shipped with the package)."""
    return tuple(json.loads(WNIDS_FILE.read_text())["wnids"])


@cache
def classnames() -> tuple[str, ...]:
    """open_clip's names of the 1000 classes, in class-index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # torch: only when used

    return tuple(IMAGENET_CLASSNAMES)


def template_set(name: str) -> list[str]:
    """One of open_clip's ImageNet prompt-template lists as ``'{}'`` strings."""
    if name not in TEMPLATE_SETS:
        raise ConfigError(
            f"unknown template set '{name}'; use one of {sorted(TEMPLATE_SETS)} or a list of "
            "templates with '{}' for the class name"
        )
    from open_clip import zero_shot_metadata

    # open_clip keeps them as lambdas (c -> f'a photo of a {c}.'); '{}' is clipshift's slot
    return [template("{}") for template in getattr(zero_shot_metadata, TEMPLATE_SETS[name])]


def folder_indices(folders: Sequence[str], source: str) -> dict[str, int]:
    """ImageNet class index of every folder: all WordNet ids, or all ImageNetV2 indices."""
    if all(_WNID.match(f) for f in folders):
        index = {w: i for i, w in enumerate(wnids())}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DataError(
                f"source '{source}': folders {unknown[:5]} are WordNet ids outside ImageNet-1k's "
                "1000 classes; class_map: imagenet maps ImageNet-1k only (write a class_map "
                "dict for other synsets)"
            )
        return {f: index[f] for f in folders}
    if all(f.isdigit() and int(f) < NUM_CLASSES and f == str(int(f)) for f in folders):
        return {f: int(f) for f in folders}  # ImageNetV2: the folder is the class index
    odd = [f for f in folders if not _WNID.match(f)][:5]
    raise DataError(
        f"source '{source}': class_map: imagenet needs WordNet-id folders (n01440764 …) or "
        f"ImageNetV2's 0 … 999, not a mix or other names (e.g. {odd}); map other layouts "
        "(ObjectNet) with a class_map dict"
    )


def task_positions(task: Sequence[str], source: str) -> dict[int, int]:
    """``{ImageNet index: task position}`` for a task made of ImageNet classes in ImageNet
    order (what a ``class_map: imagenet`` reference set defines)."""
    names = classnames()
    if list(task) == list(names):
        return {i: i for i in range(NUM_CLASSES)}
    twins = {n for n in names if names.count(n) > 1} & set(task)
    ambiguous = sorted(n for n in twins if list(task).count(n) < names.count(n))
    if ambiguous:  # the task kept one of two same-named classes: which one is unknowable
        raise DataError(
            f"source '{source}': the task has one of ImageNet's two classes named "
            f"{ambiguous}, so class_map: imagenet cannot tell which; give the reference set "
            "both folders (or all 1000) or map with a class_map dict"
        )
    out, j = {}, 0
    for i, name in enumerate(names):  # the task is a subsequence of the names, in order
        if j < len(task) and name == task[j]:
            out[i], j = j, j + 1
    if j < len(task):
        raise DataError(
            f"source '{source}': class_map: imagenet maps onto ImageNet classes, but the task's "
            f"classes are not ImageNet's names in ImageNet order (from '{task[j]}' on); give "
            "the reference (role: test) source class_map: imagenet too, with fetch.use_world: false"
        )
    return out


def reference_space(indices: Iterable[int]) -> tuple[list[str], dict[int, int]]:
    """The task a reference set defines: its ImageNet classes, in ImageNet order."""
    present = sorted(set(indices))
    names = classnames()
    return [names[i] for i in present], {i: pos for pos, i in enumerate(present)}


def label_space(
    folders: Sequence[str], task: Sequence[str] | None, source: str
) -> tuple[list[str], dict[str, int], list[int] | None]:
    """``(classes, {folder: label}, class_subset)`` of an ImageFolder tree in ImageNet layout.

    Folders of classes outside the task are left out of ``{folder: label}`` (counted as
    skipped); ``class_subset`` lists the task indices covered when that is not all of them.
    """
    by_folder = folder_indices(folders, source)
    if task is None:
        classes, positions = reference_space(by_folder.values())
    else:
        classes, positions = list(task), task_positions(task, source)
    labels = {f: positions[i] for f, i in by_folder.items() if i in positions}
    if not labels:
        raise DataError(
            f"source '{source}': none of its {len(folders)} ImageNet folders is a task class"
        )
    covered = sorted(set(labels.values()))
    return classes, labels, None if len(covered) == len(classes) else covered


def index_space(task: Sequence[str] | None, source: str) -> tuple[list[str], dict[str, int]]:
    """``(classes, {str(ImageNet index): label})`` for webdataset ``cls`` ImageNet indices
    (how ImageNet shards, e.g. CLIP_benchmark's wds_imagenet1k, store labels)."""
    if task is None:
        return list(classnames()), {str(i): i for i in range(NUM_CLASSES)}
    return list(task), {str(i): pos for i, pos in task_positions(task, source).items()}
