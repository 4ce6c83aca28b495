"""``class_map: imagenet``: ImageNet's layouts labelled with open_clip's names, no map written.

Tiny synthetic trees in tmp stand for ImageNet val (WordNet-id folders), an ImageNet-R-like
subset and ImageNetV2 (folders ``0`` … ``999``). The reference set holds both classes that
CLIP names 'missile' (657 and 744), and class 10, whose V2 folder ``10`` sorts before ``2``: a
map by name or by sorted folder position would mislabel them, a map by class index does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clipshift.config import FetchConfig, FinetuneConfig, SourceConfig
from clipshift.data import imagenet
from clipshift.data.loaders import load_labelled
from clipshift.data.shards import load_info
from clipshift.errors import DataError
from clipshift.stages.evaluate import class_mask
from clipshift.stages.fetch import run_fetch

VAL = [0, 1, 2, 10, 657, 744]  # ImageNet class indices of the reference set's folders
R_SUBSET = [1, 744, 5]  # 5 is not a task class: its folder is skipped
V2 = [0, 2, 10, 744]


def tree(root: Path, folders: list[str], per_class: int = 2) -> Path:
    """``root/<folder>/img<i>.jpg``, a colour per folder."""
    for c, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (30 * c % 256, 90, 20 * i)).save(
                root / folder / f"img{i}.jpg"
            )
    return root


def wnid_tree(root: Path, indices: list[int]) -> Path:
    return tree(root, [imagenet.wnids()[i] for i in indices])


def source(name: str, uri: Path, role: str) -> dict:
    return {
        "name": name,
        "uri": str(uri),
        "role": role,
        "format": "imagefolder",
        "class_map": "imagenet",
    }


def fetched_labels(data: Path, name: str) -> dict[str, set[int]]:
    """``{source folder: labels of its images}`` (keys are ``<folder>_img<i>``)."""
    found: dict[str, set[int]] = {}
    d = load_labelled(data / name)
    for key, label in zip(d.keys, d.labels.tolist(), strict=True):
        found.setdefault(key.split("_")[0], set()).add(label)
    return found


def test_wnids_are_imagenet_1k_in_class_order():
    ids = imagenet.wnids()
    assert len(ids) == len(set(ids)) == 1000 and list(ids) == sorted(ids)
    assert (ids[0], ids[-1]) == ("n01440764", "n15075141")
    names = imagenet.classnames()
    assert (names[0], names[10], names[657], names[744]) == (
        "tench",
        "brambling",
        "missile",
        "missile",
    )
    info = pytest.importorskip("timm.data").ImageNetInfo()  # open_clip's own dependency
    assert list(ids) == info.label_names()


def test_template_sets_come_from_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    cfg = FinetuneConfig(templates="openai-imagenet")
    assert len(cfg.templates) == 80 and cfg.templates[0] == OPENAI_IMAGENET_TEMPLATES[0]("{}")
    assert all(t.count("{}") == 1 for t in cfg.templates)
    assert len(FinetuneConfig(templates="simple-imagenet").templates) == 7
    assert FinetuneConfig(templates=["a {}."]).templates == ["a {}."]
    with pytest.raises(ValidationError, match="unknown template set"):
        FinetuneConfig(templates="imagenet-prompts")


def test_fetch_labels_every_layout_by_class_index(tmp_path):
    names = imagenet.classnames()
    task = [names[i] for i in VAL]
    cfg = FetchConfig(
        use_world=False,
        out_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        sources=[
            source("imagenet-r", wnid_tree(tmp_path / "r", R_SUBSET), "shift"),
            source("imagenet-v2", tree(tmp_path / "v2", [str(i) for i in V2]), "shift"),
            source("imagenet-val", wnid_tree(tmp_path / "val", VAL), "test"),
        ],
    )
    manifest = run_fetch(cfg, progress=False)
    assert manifest["task"]["classes"] == task  # ImageNet order; 'missile' twice
    data = tmp_path / "data"
    position = {i: p for p, i in enumerate(VAL)}

    val = fetched_labels(data, "imagenet-val")
    assert val == {imagenet.wnids()[i]: {position[i]} for i in VAL}
    v2 = fetched_labels(data, "imagenet-v2")
    assert v2 == {str(i): {position[i]} for i in V2}  # "10" is class 10, not the 3rd folder
    r = fetched_labels(data, "imagenet-r")
    assert r == {imagenet.wnids()[i]: {position[i]} for i in (1, 744)}  # the second missile

    r_info = load_info(data / "imagenet-r")
    assert r_info.classes == task
    assert r_info.extra["class_subset"] == [position[1], position[744]]
    assert r_info.extra["unmapped_classes"] == [imagenet.wnids()[5]]
    assert r_info.extra["skip_reasons"] == {"folder not in class_map": 2}
    assert class_mask(r_info).tolist() == [p in (1, 5) for p in range(len(VAL))]
    # V2 covers part of the task here too; ImageNet val covers all of it: no subset
    assert load_info(data / "imagenet-v2").extra["class_subset"] == [0, 2, 3, 5]
    assert "class_subset" not in load_info(data / "imagenet-val").extra
    assert json.loads((data / "manifest.json").read_text())["task"]["classes"] == task


def test_full_imagenet_task_and_webdataset_indices():
    names = list(imagenet.classnames())
    classes, labels, subset = imagenet.label_space(["n01440764", "n15075141"], names, "sketch")
    assert classes == names and labels == {"n01440764": 0, "n15075141": 999} and subset == [0, 999]
    assert imagenet.index_space(None, "wds") == (names, {str(i): i for i in range(1000)})
    classes, index = imagenet.index_space([names[i] for i in VAL], "wds")
    assert index == {str(i): p for p, i in enumerate(VAL)}


def test_layouts_and_tasks_it_refuses():
    names = imagenet.classnames()
    with pytest.raises(DataError, match="not a mix"):
        imagenet.folder_indices(["n01440764", "7"], "mixed")
    with pytest.raises(DataError, match="not a mix"):
        imagenet.folder_indices(["007"], "padded")  # not V2's spelling of class 7
    with pytest.raises(DataError, match="outside ImageNet-1k"):
        imagenet.folder_indices(["n00000001"], "imagenet-21k")
    with pytest.raises(DataError, match="not ImageNet's names"):
        imagenet.task_positions(["cat", "dog"], "emoji-task")
    with pytest.raises(DataError, match="cannot tell which"):
        imagenet.task_positions([names[0], "missile"], "one-missile")
    with pytest.raises(ValidationError, match="remove classnames"):
        SourceConfig(name="x", uri="/x", class_map="imagenet", classnames=["a"])
    assert torch.equal(
        torch.tensor(list(imagenet.task_positions(list(names), "full"))), torch.arange(1000)
    )
