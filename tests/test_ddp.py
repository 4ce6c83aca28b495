"""torchrun DDP on CPU (gloo): two ranks train like one process at the same global batch,
whether both ranks are on one node or each on its own "node" (two launchers meeting at a c10d
rendezvous on 127.0.0.1: the multi-node path short of networking between hosts).

Tolerance: each rank computes its half of every batch and the gradients are summed across
ranks, so results differ from one process only by float rounding (different matmul blocking
and summation order). Measured over 10 AdamW steps: |Δloss| ≤ 5e-7 and relative Δgrad-norm
≤ 2e-6, with and without gather_with_grad; we assert 1e-5 and 1e-4. (Before the logit_scale
gradient was corrected for the world-size loss weight, the relative grad-norm gap was 4e-4:
the bound is tight enough to catch such a scaling bug.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import open_clip
import pytest
import torch

from clipshift import distributed as D
from clipshift.checkpoints import load_checkpoint
from clipshift.config import PretrainConfig
from clipshift.models import tiny_vit_config
from clipshift.stages.pretrain import TIMING_KEYS, run_pretrain
from clipshift.tracking_api import RecordingTracker
from tests.test_loaders import build_pool
from tests.tiny import toy_pretrain_cfg, toy_pretrain_world

MODEL = "clipshift-test-ddp-w32"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_ranks_match_one_process(tmp_path, monkeypatch, gather_with_grad):
    build_pool(tmp_path, n=64, name="pool-toy")
    (tmp_path / f"{MODEL}.json").write_text(
        json.dumps(tiny_vit_config(32, 1, patch_size=8, context_length=16))
    )
    common = dict(
        data_dir=str(tmp_path),
        pools=["toy"],
        model=str(tmp_path / f"{MODEL}.json"),
        batch_size=32,
        samples=32 * 5,
        lr=2e-3,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        gather_with_grad=gather_with_grad,
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    logged_one = RecordingTracker()
    single = run_pretrain(
        PretrainConfig(out_dir=str(tmp_path / "one"), **common), "toy", logged_one, False
    )
    ddp_cfg = PretrainConfig(
        out_dir=str(tmp_path / "two"), distributed={"nproc_per_node": 2}, **common
    )
    logged_two = RecordingTracker()
    result = D.run_stage(run_pretrain, ddp_cfg, logged_two, pool="toy")  # the flows' call

    metrics = json.loads((tmp_path / "two" / "toy" / "metrics.json").read_text())
    # rank 0's result is the run's metrics, plus its timings (kept out of the DVC output)
    assert set(TIMING_KEYS) <= set(result)
    untimed = {k: v for k, v in result.items() if k not in TIMING_KEYS}
    assert untimed == {**metrics, "checkpoint": str(tmp_path / "two" / "toy" / "checkpoint.pt")}
    assert metrics["world_size"] == 2 and metrics["steps"] == single["steps"] == 5
    # what rank 0 logged reaches the launcher's tracker as a run in one process logs it
    steps = [step for step, _ in logged_two.metrics]
    assert steps == [step for step, _ in logged_one.metrics] == [1, 2, 3, 4, 5]
    assert logged_two.tags.keys() == logged_one.tags.keys()
    for (_, a), (_, b) in zip(logged_one.metrics, logged_two.metrics, strict=True):
        assert a.keys() == b.keys() and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    one = json.loads((tmp_path / "one" / "toy" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "toy" / "history.json").read_text())
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert one[-1]["loss"] < one[0]["loss"]

    # rank 0 wrote an open_clip checkpoint that stock open_clip loads, with near-equal weights
    path = tmp_path / "two" / "toy" / "checkpoint.pt"
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    reference = load_checkpoint(tmp_path / "one" / "toy" / "checkpoint.pt")["state_dict"]
    worst = max((model.state_dict()[k] - v).abs().max().item() for k, v in reference.items())
    assert worst < 1e-4
    assert not any(torch.isnan(v).any() for v in model.state_dict().values())


def test_two_nodes_meet_at_a_rendezvous_and_train_like_one_process(tmp_path, monkeypatch):
    """nnodes: 2 with one rank each, both "nodes" on this machine: each runs the launcher a
    Kubernetes pod runs (python -m clipshift.distributed launch), they meet at the c10d
    rendezvous, and both return rank 0's result."""
    world = toy_pretrain_world(tmp_path, MODEL)
    endpoint = f"127.0.0.1:{free_port()}"
    two_nodes = {"nnodes": 2, "nproc_per_node": 1, "rdzv_endpoint": endpoint}
    cfg = toy_pretrain_cfg(world, tmp_path / "two", MODEL, distributed=two_nodes)
    (tmp_path / "pretrain.json").write_text(cfg.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clipshift.distributed", "launch", "pretrain",
           "--config-json", str(tmp_path / "pretrain.json"), "--pool", "toy"]  # fmt: skip
    nodes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    results = [json.loads(out[out.index("{") :]) for out, _ in outputs]
    assert results[0] == results[1]  # every node's launcher returns rank 0's result
    assert results[0]["world_size"] == 2 and results[0]["steps"] == 8

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = toy_pretrain_cfg(world, tmp_path / "one", MODEL)
    run_pretrain(single, "toy", progress=False)
    one = json.loads((tmp_path / "one" / "toy" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "toy" / "history.json").read_text())
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
