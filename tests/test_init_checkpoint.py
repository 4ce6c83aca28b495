"""pretrain.init_checkpoint from s3:// (a real moto_server) and https:// (checksummed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest
import torch

from clipshift.checkpoints import save_open_clip_checkpoint
from clipshift.config import PretrainConfig
from clipshift.errors import ConfigError, DataError
from clipshift.models import create_clip, tiny_vit_config
from clipshift.stages.pretrain import build_model, run_pretrain
from tests.s3_server import run_http_server, run_moto_server, use_s3_endpoint
from tests.test_loaders import build_pool

MODEL = "clipshift-test-init-w32"


@pytest.fixture
def world(tmp_path, monkeypatch) -> tuple[Path, bytes, dict]:
    """A pool, a model config, and the bytes of a checkpoint of a seeded model of it."""
    monkeypatch.chdir(tmp_path)  # the download cache (.cache/clipshift) lands in tmp_path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    build_pool(tmp_path, n=32, name="pool-toy")
    config = tiny_vit_config(32, 1, patch_size=8, context_length=16)
    (tmp_path / f"{MODEL}.json").write_text(json.dumps(config))
    torch.manual_seed(123)
    bundle = create_clip(MODEL, config=config)
    save_open_clip_checkpoint(tmp_path / "src" / "ckpt.pt", bundle.model, MODEL, config)
    weights = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    return tmp_path, (tmp_path / "src" / "ckpt.pt").read_bytes(), weights


def cfg(root: Path, init: str) -> PretrainConfig:
    return PretrainConfig(
        data_dir=str(root),
        out_dir=str(root / "out"),
        pools=["toy"],
        model=str(root / f"{MODEL}.json"),
        init_checkpoint=init,
        batch_size=16,
        samples=32,
        warmup_steps=1,
        log_every=1,
        workers=0,
    )


def assert_same_weights(model: torch.nn.Module, weights: dict) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_s3_checkpoint_initialises_pretraining(world, monkeypatch):
    root, blob, weights = world
    with run_moto_server() as url:
        use_s3_endpoint(monkeypatch, url)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="weights")
        s3.put_object(Bucket="weights", Key="clip/ckpt.pt", Body=blob)
        config = cfg(root, "s3://weights/clip/ckpt.pt")  # config validation accepts the URI

        bundle = build_model(config, torch.device("cpu"))
        assert_same_weights(bundle.model, weights)
        (cached,) = (root / ".cache/clipshift/downloads").glob("*-ckpt.pt")
        assert cached.read_bytes() == blob
        stamp = cached.stat().st_mtime_ns
        result = run_pretrain(config, "toy", progress=False)  # the whole stage, from S3 weights
        assert result["steps"] == 2 and cached.stat().st_mtime_ns == stamp  # cache reused

        with pytest.raises(DataError, match="weights/clip/missing.pt"):
            build_model(cfg(root, "s3://weights/clip/missing.pt"), torch.device("cpu"))


def test_https_checkpoint_needs_and_checks_sha256(world):
    root, blob, weights = world
    digest = hashlib.sha256(blob).hexdigest()
    with run_http_server() as server:
        server.files["/ckpt.pt"] = blob
        url = f"{server.base_url}/ckpt.pt"
        with pytest.raises(ConfigError, match="#sha256="):
            build_model(cfg(root, url), torch.device("cpu"))
        with pytest.raises(DataError, match="sha256 mismatch"):
            build_model(cfg(root, f"{url}#sha256={'0' * 64}"), torch.device("cpu"))
        bundle = build_model(cfg(root, f"{url}#sha256={digest}"), torch.device("cpu"))
    assert_same_weights(bundle.model, weights)
    assert (root / ".cache/clipshift/downloads" / digest).read_bytes() == blob
