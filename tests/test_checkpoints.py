"""Checkpoints: atomic writes, checksums, refusing unsafe pickles, stock open_clip loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch

from clipshift import checkpoints as ck
from clipshift.errors import CheckpointError
from clipshift.models import create_clip, tiny_vit_config

NAME = "clipshift-test-ckpt-w32-l1"


def resumable(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step}


def test_save_and_load_roundtrip_with_sidecar(tmp_path):
    path = tmp_path / "a" / "state.pt"
    ck.save_checkpoint(path, {"x": torch.arange(5), "meta": {"step": 3, "name": "n"}})
    assert ck.sidecar_path(path).read_text().split()[0] == ck.sha256_file(path)
    state = ck.load_checkpoint(path)
    assert torch.equal(state["x"], torch.arange(5)) and state["meta"]["step"] == 3
    assert not path.with_name("state.pt.tmp").exists()


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ck.save_checkpoint(path, {"v": torch.tensor(1)})

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"v": torch.tensor(2)})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["v"].item() == 1
    assert not path.with_name("state.pt.tmp").exists()


@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_checkpoint_is_refused(tmp_path, sidecar):
    path = tmp_path / "step-000010.pt"
    ck.save_checkpoint(path, {"w": torch.randn(1000)})
    if not sidecar:
        ck.sidecar_path(path).unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        ck.load_checkpoint(path)
    assert str(path) in str(err.value) and "previous checkpoint" in str(err.value)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Evil(marker)}, path)
    # an attacker can also forge the checksum: safety may not rest on the sidecar
    ck.sidecar_path(path).write_text(ck.sha256_file(path) + "  evil.pt\n")
    with pytest.raises(CheckpointError, match="refused"):
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_latest_checkpoint_skips_corrupt_and_partial(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        ck.save_checkpoint(tmp_path / f"step-{step:06d}.pt", resumable(step))
    ck.save_checkpoint(tmp_path / "step-000040.pt", {"model": {}})  # not resumable
    newest = tmp_path / "step-000030.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # damaged after writing
    (tmp_path / "step-000050.pt.tmp").write_bytes(b"junk")  # a crash leftover
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step-000020.pt"


class FakeDDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_open_clip_checkpoint_loads_with_stock_open_clip(tmp_path):
    config = tiny_vit_config(32, 1)
    torch.manual_seed(0)
    bundle = create_clip(NAME, config=config)
    folder = tmp_path / "model"
    path = folder / "checkpoint.pt"
    ck.save_open_clip_checkpoint(path, FakeDDP(bundle.model), NAME, config, {"step": 7})
    state = ck.load_checkpoint(path)
    assert state["name"] == NAME and state["step"] == 7 and state["model_config"] == config
    assert not any(k.startswith("module.") for k in state["state_dict"])
    # the architecture beside the checkpoint, named so that open_clip registers it as NAME
    assert ck.config_path(path, NAME) == folder / f"{NAME}.json"
    assert json.loads((folder / f"{NAME}.json").read_text()) == config
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["checkpoint.pt", "checkpoint.pt.sha256", f"{NAME}.json"]
    )

    # a fresh interpreter with nothing but open_clip, exactly as the README says: register the
    # folder's configs, load the checkpoint by architecture name
    script = textwrap.dedent(f"""
        import sys, torch, open_clip
        open_clip.add_model_config({str(folder)!r})
        model, _, preprocess = open_clip.create_model_and_transforms(
            {NAME!r}, pretrained={str(path)!r})
        assert "clipshift" not in sys.modules
        torch.save(model.state_dict(), {str(tmp_path / "loaded.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120, cwd=tmp_path)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    expected = bundle.model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key

    # and in this process, the stock call by name
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, bundle.model.state_dict()[key]), key


def test_config_path_refuses_a_name_that_is_not_a_file_name(tmp_path):
    for name in ("", "a/b", "..", "hf-hub:org/model"):
        with pytest.raises(CheckpointError, match="architecture name"):
            ck.config_path(tmp_path / "checkpoint.pt", name)
