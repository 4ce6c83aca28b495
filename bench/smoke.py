"""Smoke mode (``--smoke``): every benchmark end to end in seconds, so none can rot unseen.

What a smoke run uses instead of the real inputs: a tiny emoji world (5 classes, a pool of 80
pairs) built into ``--data-dir`` unless it already holds one, and a toy architecture (a
1-layer, 32-wide ViT, patch 8) that no script or peer knows by name, so that a benchmark
which does not take its architecture from the checkpoint or from ``--model`` fails here.
The world uses only the art shipped as Python packages (no npm styles): nothing is
downloaded. Its numbers mean nothing; ``tests/test_bench_smoke.py`` runs every script so.

Standard library only at import (the peer side imports the bench scripts, which import this).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import common as C

TOY_MODEL = "bench-toy"
# As the integration tests' tiny world (tests/tiny.py), restricted to the styles whose art
# comes with the project venv: the npm styles (noto, fluent, fluent_line) could download.
TINY_WORLD: dict[str, Any] = {
    "image_size": 32,
    "num_classes": 5,
    "shift_styles": ["openmoji", "silhouette", "corrupt"],
    "diverse_styles": ["twemoji", "openmoji", "noto_line"],
    "narrow_styles": ["twemoji", "noto_line"],
    "train_per_class": 4,
    "val_per_class": 2,
    "test_per_class": 2,
    "shift_per_class": 2,
    "pool_size": 80,
    "retrieval_size": 20,
    "shard_size": 50,
}
# clipshift.models.tiny_vit_config(32, 1, patch_size=8, context_length=16), written out: the
# parent process of a benchmark stays free of torch (importing it costs seconds).
TOY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}
# The toy checkpoint of bench_eval and bench_wiseft: 4 steps of 16 on the tiny pool.
TOY_PRETRAIN: dict[str, Any] = {"train_samples": 64, "train_batch_size": 16}


def prepare(args: argparse.Namespace) -> None:
    """No-op unless ``--smoke``: build the tiny world, and make the toy model the one
    trained (where the script trains and ``--model`` was not given)."""
    if not args.smoke:
        return
    C.say(f"smoke: work in {args.work_dir}, data {args.data_dir}, results {args.results_dir}")
    ensure_world(args.data_dir)
    if getattr(args, "model", "") is None:
        args.model = toy_model(args.work_dir)


def ensure_world(data_dir: Path) -> None:
    """The tiny world in ``data_dir``, built unless there (fetch writes its manifest last,
    so a manifest means a complete world)."""
    if (data_dir / "manifest.json").exists():
        return
    if data_dir.exists() and any(data_dir.iterdir()):  # fetch would prune what it did not make
        raise SystemExit(f"{data_dir} holds files but no world: give an empty --data-dir")
    from clipshift.config import FetchConfig, WorldConfig
    from clipshift.stages.fetch import run_fetch

    C.say(f"smoke: building a tiny world in {data_dir}…")
    cfg = FetchConfig(
        world=WorldConfig(**TINY_WORLD),
        out_dir=str(data_dir),
        cache_dir=str(C.REPO / ".cache" / "clipshift"),  # the art cache the tests share
    )
    run_fetch(cfg, progress=False)


def toy_model(work_dir: Path) -> str:
    """The toy architecture as a config JSON path (a valid ``pretrain.model``)."""
    path = work_dir / f"{TOY_MODEL}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TOY_CONFIG, indent=2) + "\n")
    return str(path)
