"""Tiny configurations shared by the integration tests: the whole world in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The rendered-art and npm caches are shared by all tests (building them costs seconds).
ART_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "clipshift"

TINY_WORLD: dict[str, Any] = {
    "image_size": 32,
    "num_classes": 5,
    "train_per_class": 4,
    "val_per_class": 2,
    "test_per_class": 2,
    "shift_per_class": 2,
    "pool_size": 80,
    "retrieval_size": 20,
    "shard_size": 50,
}


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in key by key (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def full_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's params.yaml with ``overrides`` merged in: a params file lists every
    section (clipshift.config.PipelineConfig), as a user's edited copy would."""
    import yaml

    return merged(yaml.safe_load(REPO_PARAMS.read_text()), overrides or {})


def tiny_params() -> dict[str, Any]:
    """A params.yaml for a whole-pipeline run in a couple of minutes on 2 cores."""
    return full_params(
        {
            "fetch": {"world": dict(TINY_WORLD)},
            "pretrain": {
                "model": "clipshift-vit-micro",
                "samples": 256,
                "batch_size": 32,
                "warmup_steps": 2,
                "log_every": 2,
                "checkpoint_every": 4,
                "workers": 0,
            },
            "finetune": {
                "e2e_epochs": 1,
                "e2e_batch_size": 16,
                "e2e_lr": 3e-4,
                "soup_ingredients": [{"lr": 1e-4, "epochs": 1}] * 3,
                "linear_epochs": 20,
                "knn_k": 3,
                "baselines": [
                    {"width": 32, "layers": 1, "epochs": e, "fraction": f}
                    for e, f in [(1, 0.5), (2, 1.0), (4, 1.0)]
                ],
            },
            "scaling": {
                "grid": [
                    {"width": 32, "layers": 1, "samples": 64},
                    {"width": 32, "layers": 1, "samples": 128},
                    {"width": 64, "layers": 1, "samples": 128},
                ],
                "pool_size": {
                    "fractions": [0.5, 1.0],
                    "run": {"width": 32, "layers": 1, "samples": 64},
                },
                "bootstrap": 20,
                "batch_size": 32,
            },
        }
    )


def tree_hash(root: Path) -> str:
    """sha256 over a directory's sorted relative file paths and their bytes: equal hashes mean
    byte-identical trees (what DVC's directory hash compares)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            name = path.relative_to(root).as_posix().encode()
            digest.update(b"%d:%s:%d:" % (len(name), name, len(data)) + data)
    return digest.hexdigest()


def tree_diff(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on one side, or other bytes)."""
    files = {p.relative_to(a).as_posix() for p in Path(a).rglob("*") if p.is_file()}
    files |= {p.relative_to(b).as_posix() for p in Path(b).rglob("*") if p.is_file()}
    return sorted(
        f
        for f in files
        if not ((a / f).is_file() and (b / f).is_file())
        or (a / f).read_bytes() != (b / f).read_bytes()
    )


def copy_sample_into(data_dir: str, source: str, target: str) -> str:
    """Plant the first image of ``source`` into dataset ``target`` (a leak); returns its key."""
    import tarfile
    from pathlib import Path

    from clipshift.data.shards import ShardWriter, group_members, load_info

    def raw_samples(name: str):
        info = load_info(Path(data_dir) / name)
        for path in info.shard_paths(Path(data_dir) / name):
            with tarfile.open(path) as tar:
                for key, group in group_members(tar):
                    yield {"__key__": key, **group}

    leaked = next(raw_samples(source))
    leaked["__key__"] = "leaked-" + leaked["__key__"]
    leaked.setdefault("txt", b"a leaked test image")
    leaked.pop("cls", None)
    rows = list(raw_samples(target)) + [leaked]
    info = load_info(Path(data_dir) / target)
    with ShardWriter(Path(data_dir) / target, info, shard_size=10_000) as writer:
        writer.write_all(rows)
    return leaked["__key__"]


def toy_pretrain_world(root: Path, model: str, n: int = 64) -> Path:
    """A 64-pair pool ``pool-toy`` and a 1-layer, 32-wide ViT config ``<model>.json`` in root."""
    import json

    from clipshift.models import tiny_vit_config
    from tests.test_loaders import build_pool

    build_pool(root, n=n, name="pool-toy")
    config = tiny_vit_config(32, 1, patch_size=8, context_length=16)
    (root / f"{model}.json").write_text(json.dumps(config))
    return root


def toy_pretrain_cfg(world: Path, out: Path, model: str, **overrides: Any):
    """Pretraining on ``toy_pretrain_world``: 8 steps of 32, a resume checkpoint every 3."""
    from clipshift.config import PretrainConfig

    base = dict(
        data_dir=str(world),
        out_dir=str(out),
        pools=["toy"],
        model=str(world / f"{model}.json"),
        batch_size=32,
        samples=32 * 8,
        lr=2e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=3,
        seed=0,
    )
    return PretrainConfig(**{**base, **overrides})
