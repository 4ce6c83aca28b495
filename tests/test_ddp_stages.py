"""finetune and evaluate under torchrun (2 ranks, gloo on CPU), launched by their flows.

- **evaluate**: each rank scores a run of whole batches of every dataset and the predictions
  are gathered, so the accuracies are *exactly* those of one process (asserted with ==),
  including a shift scored over a class subset.
- **finetune**: DDP at the same global batch. Every rank draws the same global batch and
  augmentation, takes its rows, and the loss is scaled so the all-reduced gradient is the
  full-batch one. Measured with a probe of the optimizer's inputs (3 steps, batches of
  12/12/8 rows): the 2-rank gradients differ from one process by ≤ 1.3e-6 relative, i.e.
  float rounding (matmul blocking, summation order). AdamW divides by sqrt(v) per parameter,
  so parameters whose gradient is ~0 take a ~lr-sized step whose sign rounding decides:
  after 6 steps at lr 1e-3 the fine-tune's weights differ by up to 1.3e-4 (of ~6e-3
  moved), the baselines' (3-9 steps) by 6e-6 to 4e-5; val accuracies are identical. We
  assert 5e-4 (half of one step at this lr).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipshift.checkpoints import load_checkpoint, save_open_clip_checkpoint
from clipshift.config import BaselineSpec, EvaluateConfig, FinetuneConfig
from clipshift.data.shards import DatasetInfo, ShardWriter
from clipshift.distributed import shard_range
from clipshift.stages.evaluate import run_evaluate
from clipshift.stages.finetune import run_finetune
from tests.test_finetune import CLASSES, tiny_bundle, toy_data

SUBSET = ["cat", "car"]  # the classes the "shift-sub" dataset covers (an ImageNet-R-like set)


def write_labelled(root: Path, name: str, role: str, data, extra: dict | None = None) -> None:
    info = DatasetInfo(
        name=name, role=role, num_samples=0, classes=list(CLASSES), image_size=32, extra=extra or {}
    )
    with ShardWriter(root / name, info, shard_size=1000) as writer:
        for key, img, label in zip(data.keys, data.images, data.labels.tolist(), strict=True):
            image = Image.fromarray(img.permute(1, 2, 0).numpy())
            writer.write({"__key__": key, "png": image, "cls": label, "txt": CLASSES[label]})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-stages")
    data = root / "data"
    for i, (name, role) in enumerate(
        [("train", "train"), ("val", "val"), ("test", "test"), ("shift-a", "shift")]
    ):
        write_labelled(data, name, role, toy_data(8 if name == "train" else 4, seed=10 + i))
    sub = toy_data(4, seed=20)
    keep = torch.isin(sub.labels, torch.tensor([CLASSES.index(c) for c in SUBSET]))
    write_labelled(data, "shift-sub", "shift", sub.subset(keep.nonzero().flatten()),
                   {"class_subset": SUBSET})  # fmt: skip
    bundle = tiny_bundle(seed=0)
    path = root / "models" / "pretrain" / "diverse" / "checkpoint.pt"
    save_open_clip_checkpoint(path, bundle.model, bundle.name, bundle.config)
    return root


@pytest.fixture
def one_thread():
    """Both sides run with one thread per process (torchrun gives each rank one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finetune_cfg(world: Path, out: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(
        data_dir=str(world / "data"),
        pretrain_dir=str(world / "models" / "pretrain"),
        out_dir=str(world / "models" / out),
        pool="diverse",
        e2e_epochs=2,
        e2e_batch_size=12,  # 32 train images: batches of 12, 12, 8 (uneven last batch)
        e2e_lr=1e-3,
        soup_ingredients=[],
        linear_epochs=10,
        knn_k=3,
        baselines=[BaselineSpec(width=32, layers=1, epochs=e, fraction=1.0) for e in (1, 2, 3)],
        batch_size=64,
        templates=["a {}."],
        **kw,
    )


def evaluate_cfg(world: Path, models: Path, tag: str, **kw) -> EvaluateConfig:
    return EvaluateConfig(
        data_dir=str(world / "data"),
        models_dir=str(models),
        validate_dir=str(world / "validate"),
        metrics_path=str(world / tag / "evaluate.json"),
        plots_dir=str(world / tag / "plots"),
        batch_size=6,  # 16 test images: rank 0 scores 1 batch, rank 1 the other 2
        register_model=False,
        **kw,
    )


@pytest.mark.parametrize("n,batch,world", [(16, 6, 2), (5, 8, 2), (100, 7, 3), (0, 4, 2)])
def test_shards_are_whole_batches_in_order_covering_everything(n, batch, world):
    parts = [shard_range(n, batch, r, world) for r in range(world)]
    assert [i for part in parts for i in part] == list(range(n))
    assert all(p.start % batch == 0 for p in parts if len(p))


@pytest.mark.slow
def test_finetune_and_evaluate_two_ranks_match_one_process(
    world, mlflow_store, prefect_harness, one_thread
):
    from flows.evaluate import evaluate_flow
    from flows.finetune import finetune_flow

    one = run_finetune(finetune_cfg(world, "one/finetune"), progress=False)
    two_ranks = {"nproc_per_node": 2}
    two = finetune_flow(config=finetune_cfg(world, "two/finetune", distributed=two_ranks))

    assert two["world_size"] == 2 and one["world_size"] == 1
    assert set(one["models"]) == set(two["models"])
    for mid in ["finetuned-diverse-0", "baseline-00", "baseline-01", "baseline-02"]:
        assert one["models"][mid]["val_accuracy"] == two["models"][mid]["val_accuracy"], mid
        a = load_checkpoint(world / "models" / "one" / "finetune" / f"{mid}.pt")["state_dict"]
        b = load_checkpoint(world / "models" / "two" / "finetune" / f"{mid}.pt")["state_dict"]
        gap = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{mid}: max |Δweight| 1 vs 2 ranks = {gap:.2e}")
        assert gap < 5e-4, mid
    start = load_checkpoint(world / "models" / "one" / "finetune" / "zeroshot-diverse.pt")
    tuned = load_checkpoint(world / "models" / "one" / "finetune" / "finetuned-diverse-0.pt")
    moved = max(
        (start["state_dict"][k] - v).abs().max().item() for k, v in tuned["state_dict"].items()
    )
    assert moved > 1e-3  # the comparison is between models that actually trained

    models = world / "models" / "one"  # evaluate reads <models_dir>/*/index.json
    single = run_evaluate(evaluate_cfg(world, models, "metrics-one"), progress=False)
    sharded = evaluate_flow(
        config=evaluate_cfg(world, models, "metrics-two", distributed=two_ranks)
    )
    assert sharded["world_size"] == 2
    assert sharded["class_subsets"] == {"shift-sub": len(SUBSET)}
    for mid, rec in single["models"].items():
        assert rec["accuracy"] == sharded["models"][mid]["accuracy"], mid
    written = json.loads((world / "metrics-two" / "evaluate.json").read_text())
    assert (
        written["models"]["zeroshot-diverse"]["accuracy"]
        == single["models"]["zeroshot-diverse"]["accuracy"]
    )
