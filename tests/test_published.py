"""pretrain.pretrained: published weights from a real, local Hugging Face hub cache.

Each test builds the cache the way huggingface_hub stores a download
(``hub/models--org--name/{blobs, refs/main, snapshots/<commit>/…}``, the snapshot's files links
to content-addressed blobs) holding a tiny open_clip model in the hub's open_clip layout
(``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, weights as
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), then sets ``HF_HOME`` and
``HF_HUB_OFFLINE=1``: open_clip and huggingface_hub resolve everything from that cache and
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from pydantic import ValidationError
from safetensors.torch import save_file

from clipshift import published as P
from clipshift.checkpoints import load_checkpoint, sidecar_path
from clipshift.config import TESTBED, PretrainConfig, load_params
from clipshift.data.shards import sha256_file
from clipshift.errors import ConfigError, DataError
from clipshift.models import create_clip, tiny_vit_config
from clipshift.stages.pretrain import run_pretrain
from tests.tiny import toy_pretrain_cfg, toy_pretrain_world

REPO_ID = "clipshift-test/tiny-clip"
HUB = f"hf-hub:{REPO_ID}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = tiny_vit_config(32, 1, patch_size=8, context_length=16)  # toy_pretrain_world's model
PREPROCESS = {
    "size": 32,
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


# --------------------------------------------------------------------------------------------
# a hub cache as huggingface_hub writes it


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _cached_file(repo_dir: Path, name: str, data: bytes, lfs: bool) -> None:
    """A snapshot file linked to its blob (named by sha256 for LFS files, else git's id)."""
    blob = hashlib.sha256(data).hexdigest() if lfs else _git_blob_id(data)
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs" / blob).write_bytes(data)
    link = repo_dir / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob, link.parent))


def hub_model(
    hf_home: Path,
    repo_id: str = REPO_ID,
    seed: int = 7,
    weights: str | None = "open_clip_model.safetensors",
    preprocess: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """A seeded tiny CLIP published as ``repo_id`` in ``<hf_home>/hub``; returns its weights
    (``weights``: the file name, safetensors or a torch pickle; None: config only)."""
    torch.manual_seed(seed)
    model = open_clip.create_model("clipshift-published-test", pretrained=None)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    config = {"model_cfg": CONFIG, "preprocess_cfg": preprocess or PREPROCESS}
    _cached_file(repo_dir, P.CONFIG_FILE, json.dumps(config).encode(), lfs=False)
    if weights is not None:
        path = hf_home / "weights.tmp"
        if weights.endswith(".safetensors"):
            save_file(state, str(path))
        else:
            torch.save(state, path)
        _cached_file(repo_dir, weights, path.read_bytes(), lfs=True)
        path.unlink()
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return state


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path, offline; the tiny architecture known to open_clip."""
    from clipshift.models import register_model_config

    register_model_config("clipshift-published-test", CONFIG)
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return home


def assert_same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def snapshot_file(home: Path, name: str, repo_id: str = REPO_ID) -> Path:
    return home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT / name


# --------------------------------------------------------------------------------------------
# loading


def test_hub_id_loads_the_published_weights_from_the_cache(offline_hub):
    weights = hub_model(offline_hub)
    found = P.resolve("clipshift-vit-micro", HUB)
    weights_file = snapshot_file(offline_hub, "open_clip_model.safetensors")
    assert found.weights == weights_file
    assert found.sha256 == sha256_file(weights_file)
    assert found.architecture == "clipshift-test--tiny-clip" and found.config == CONFIG
    bundle = P.load(found, "clipshift-vit-micro")
    assert_same_weights(bundle.model, weights)
    assert bundle.name == found.architecture and bundle.image_size == 32
    assert bundle.tokenizer(["a cat"]).shape == (1, 16)  # the hub config's context length


def test_open_clip_tag_resolves_through_the_same_cache(offline_hub, monkeypatch):
    """A tag of the architecture (open_clip's registry entry points at a hub repository, as
    laion2b_s34b_b79k does for ViT-B-32) in the torch-pickle weights format."""
    weights = hub_model(offline_hub, weights="open_clip_pytorch_model.bin")
    entry = {"tinytag": {"url": "", "hf_hub": f"{REPO_ID}/", **PREPROCESS}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clipshift-published-test", entry)
    found = P.resolve("clipshift-published-test", "tinytag")
    assert found.weights == snapshot_file(offline_hub, "open_clip_pytorch_model.bin")
    assert found.architecture == "clipshift-published-test" and found.config == CONFIG
    assert_same_weights(P.load(found, "clipshift-published-test").model, weights)


# --------------------------------------------------------------------------------------------
# the pretrain stage


def hub_cfg(root: Path, **overrides: Any) -> PretrainConfig:
    base = {"pretrained": HUB, "samples": 0, "warmup_steps": 0, "lr": 1e-4}
    return toy_pretrain_cfg(root, root / "out", "toy-arch", **{**base, **overrides})


def test_samples_zero_records_the_published_model_for_stock_open_clip(offline_hub, tmp_path):
    weights = hub_model(offline_hub)
    (tmp_path / "toy-arch.json").write_text(json.dumps(CONFIG))  # no pool: none is read
    result = run_pretrain(hub_cfg(tmp_path), "toy", progress=False)

    run_dir = tmp_path / "out" / "toy"
    checkpoint = run_dir / "checkpoint.pt"
    assert result["steps"] == 0 and result["samples"] == 0 and result["loader"] == "none"
    sha = sha256_file(snapshot_file(offline_hub, "open_clip_model.safetensors"))
    state = load_checkpoint(checkpoint)
    for record in (result, state, json.loads((run_dir / "metrics.json").read_text())):
        assert record["pretrained"] == HUB and record["pretrained_sha256"] == sha
        assert record["pretrained_architecture"] == "clipshift-test--tiny-clip"
    assert state["training_spec"]["pretrain.init_sha256"] == sha
    assert sidecar_path(checkpoint).read_text().split()[0] == sha256_file(checkpoint)
    assert not (run_dir / "resume").exists()  # no training state was ever written
    # stock open_clip: register the folder's architecture file, load the checkpoint
    open_clip.add_model_config(run_dir)
    model, _, _ = open_clip.create_model_and_transforms(
        "clipshift-test--tiny-clip", pretrained=str(checkpoint), weights_only=True
    )
    assert_same_weights(model, weights)
    again = run_pretrain(hub_cfg(tmp_path), "toy", progress=False)
    assert again["reused"] is True  # same published file, same spec: nothing rewritten


def test_samples_continue_pretraining_from_the_published_weights(offline_hub, tmp_path):
    weights = hub_model(offline_hub)
    toy_pretrain_world(tmp_path, "toy-arch")
    result = run_pretrain(hub_cfg(tmp_path, samples=64), "toy", progress=False)
    assert result["steps"] == 2 and result["pretrained"] == HUB
    trained = load_checkpoint(tmp_path / "out" / "toy" / "checkpoint.pt")["state_dict"]
    scratch = create_clip("clipshift-published-test").model.state_dict()  # another init

    def distance(state: dict[str, torch.Tensor]) -> float:
        return sum(float((state[k].float() - v.float()).norm()) for k, v in weights.items())

    moved = distance(trained)
    assert 0 < moved < distance(scratch) / 10  # trained, and from the published weights


# --------------------------------------------------------------------------------------------
# errors


def test_a_model_missing_offline_names_the_id_the_cache_and_the_fix(offline_hub):
    with pytest.raises(DataError) as missing:
        P.resolve("clipshift-vit-micro", "hf-hub:nobody/not-cached")
    text = str(missing.value)
    assert "hf-hub:nobody/not-cached" in text and str(offline_hub / "hub") in text
    assert "HF_HUB_OFFLINE=1" in text and "HF_HOME" in text and "run once online" in text.lower()
    assert "models--nobody--not-cached" in text
    with pytest.raises(DataError) as tag:  # a tag names the hub repository it stands for
        P.resolve("ViT-B-32", "laion2b_s34b_b79k")
    assert "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" in str(tag.value)
    assert not (offline_hub / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K").exists()


def test_a_cached_config_without_weights_is_an_error_not_a_random_model(offline_hub):
    """open_clip only warns when a hub repository's weights are missing and returns a
    randomly initialised model; clipshift refuses."""
    hub_model(offline_hub, weights=None)
    with pytest.raises(DataError, match="cannot load its weights file"):
        P.resolve("clipshift-vit-micro", HUB)


def test_unknown_tag_lists_the_architectures_tags():
    with pytest.raises(ValidationError, match="laion2b_s34b_b79k") as bad:
        PretrainConfig(model="ViT-B-32", pretrained="laion2b_s99b", samples=0)
    assert "'laion2b_s99b' is not an open_clip pretrained tag" in str(bad.value)
    with pytest.raises(ValidationError, match=r"its tags: none"):
        PretrainConfig(model="clipshift-vit-micro", pretrained="openai")
    with pytest.raises(ValidationError, match="hf-hub:<org>/<name>"):
        PretrainConfig(pretrained="hf-hub:just-a-name")
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):  # a flow parameter, unchecked
        P.resolve("ViT-B-32", "laion2b_s99b")


def test_one_starting_point_and_samples_zero_needs_one(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(ValidationError, match="both name starting weights"):
        PretrainConfig(init_checkpoint=str(tmp_path / "ckpt.pt"), pretrained=HUB)
    with pytest.raises(ValidationError, match="samples: 0 records the starting model"):
        PretrainConfig(samples=0)


def test_no_baselines_only_with_the_external_line_alone(tmp_path):
    from tests.tiny import full_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(full_params({"finetune": {"baselines": []}})))
    with pytest.raises(ConfigError, match="finetune.baselines is empty"):
        load_params(params)
    replace = {"external_baselines": TESTBED, "external_mode": "replace"}
    params.write_text(yaml.safe_dump(full_params({"finetune": {"baselines": []},
                                                   "evaluate": replace})))  # fmt: skip
    assert load_params(params).finetune.baselines == []


def test_the_readme_recipe_is_a_valid_configuration(tmp_path):
    """The README's ViT-B-32 block, merged into params.yaml, validates as it stands: the
    published tag, ImageNet class maps everywhere, no baselines, the testbed line."""
    from tests.tiny import REPO_PARAMS, full_params

    readme = (REPO_PARAMS.parent / "README.md").read_text()
    section = readme.split("### Published CLIP on ImageNet", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params(yaml.safe_load(block))))
    cfg = load_params(tmp_path / "params.yaml")
    assert (cfg.pretrain.model, cfg.pretrain.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert cfg.pretrain.samples == 0 and cfg.finetune.baselines == []
    assert {s.class_map for s in cfg.fetch.sources} == {"imagenet"}
    shifts = {s.name for s in cfg.fetch.sources if s.role == "shift"}
    assert shifts == set(SHIFT_FOLDERS) and cfg.evaluate.external_baselines == TESTBED


def test_other_image_statistics_are_refused(offline_hub):
    hub_model(offline_hub, preprocess={**PREPROCESS, "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ConfigError, match=r"mean \(0.5, 0.5, 0.5\)"):
        P.resolve("clipshift-vit-micro", HUB)


# --------------------------------------------------------------------------------------------
# the README's ImageNet recipe on the tiny hub model, end to end


def imagenet_params(root: Path) -> dict[str, Any]:
    """The README's ViT-B-32 recipe, with the tiny hub model and tiny local trees."""
    from tests.tiny import full_params

    def source(name: str, role: str, folder: str) -> dict[str, Any]:
        return {"name": name, "uri": str(root / folder), "role": role,
                "format": "imagefolder", "class_map": "imagenet"}  # fmt: skip

    sources = [source("train", "train", "train"), source("val", "val", "val"),
               source("imagenet-val", "test", "imagenet/val")]  # fmt: skip
    sources += [source(s, "shift", s) for s in SHIFT_FOLDERS]
    return full_params(
        {
            "fetch": {"use_world": False, "sources": sources},
            "pretrain": {
                "model": "ViT-B-32",
                "pretrained": HUB,
                "samples": 0,
                "pools": ["hub"],
            },  # fmt: skip
            "supervised": {"pools": ["hub"]},
            "finetune": {
                "pool": "hub",
                "templates": "simple-imagenet",
                "e2e_epochs": 1,
                "e2e_batch_size": 8,
                "soup_ingredients": [],
                "linear_epochs": 5,
                "knn_k": 3,
                "baselines": [],
            },  # fmt: skip
            "interpolate": {"alphas": [0.0, 0.5, 1.0], "soups": []},
            "evaluate": {
                "external_baselines": TESTBED,
                "external_mode": "replace",
                "register_model": False,
                "bootstrap": 20,
            },  # fmt: skip
        }
    )


# shift name -> the ImageNet classes it has folders for (of WNIDS: ImageNet classes 0-4);
# -V2's folders are class indices, -R/-A's a subset, -Sketch's every class
SHIFT_FOLDERS = {"imagenet-v2": None, "imagenet-sketch": None, "imagenet-r": 2, "imagenet-a": 3}


def imagenet_trees(root: Path) -> None:
    from tests.test_imagenet_layout import WNIDS, image_folder

    wnids = list(WNIDS)
    image_folder(root / "train", wnids, 4, "JPEG", seed=0)
    image_folder(root / "val", wnids, 2, "JPEG", seed=1)
    image_folder(root / "imagenet" / "val", wnids, 3, "JPEG", seed=2)
    image_folder(root / "imagenet-sketch", wnids, 2, "JPEG", seed=3)
    image_folder(root / "imagenet-r", wnids[:2], 2, "jpg", seed=4)
    image_folder(root / "imagenet-a", wnids[1:4], 2, "jpg", seed=5)
    image_folder(root / "imagenet-v2", [str(i) for i in range(len(wnids))], 2, "jpeg", seed=6)


def test_hub_model_through_finetune_interpolate_evaluate_offline(
    offline_hub, tmp_path, mlflow_store, prefect_harness
):
    from clipshift.stages.evaluate import run_evaluate
    from clipshift.stages.fetch import run_fetch
    from clipshift.stages.finetune import run_finetune
    from clipshift.stages.interpolate import run_interpolate
    from flows.pretrain import pretrain_flow

    hub_model(offline_hub)
    imagenet_trees(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(imagenet_params(tmp_path)))
    cfg = load_params(tmp_path / "params.yaml")  # no pool is fetched: samples 0 needs none

    run_fetch(cfg.fetch, progress=False)
    pretrain_flow(config=cfg.pretrain)
    run_finetune(cfg.finetune, progress=False)
    run_interpolate(cfg.interpolate)
    summary = run_evaluate(cfg.evaluate, progress=False)

    sha = sha256_file(snapshot_file(offline_hub, "open_clip_model.safetensors"))
    metrics = json.loads((tmp_path / "metrics" / "pretrain" / "hub.json").read_text())
    assert metrics["pretrained"] == HUB and metrics["pretrained_sha256"] == sha
    assert set(summary["testbed"]["shifts"]) == set(SHIFT_FOLDERS)
    models = summary["models"]
    for name in ("zeroshot-hub", "finetuned-hub-0", "wiseft-hub-a0.5"):
        er = models[name]["effective_robustness"]
        assert set(SHIFT_FOLDERS) <= set(er)
        assert all(isinstance(er[s], float) for s in SHIFT_FOLDERS)
    assert summary["class_subsets"] == {"imagenet-r": 2, "imagenet-a": 3}
    assert_mlflow_lineage(mlflow_store, HUB, sha)


def assert_mlflow_lineage(uri: str, value: str, sha: str) -> None:
    """The pretrain run's params and its LoggedModel name the published weights."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    (model,) = [
        m for m in client.search_logged_models(exp_ids) if m.params.get("pretrained") == value
    ]
    assert model.params["pretrained_sha256"] == sha
    assert model.params["samples"] == "0"
    run = client.get_run(model.source_run_id)
    assert run.data.params["pretrained"] == value and run.data.params["pretrained_sha256"] == sha
