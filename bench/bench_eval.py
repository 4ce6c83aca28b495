"""Zero-shot evaluation: clipshift (``evaluate``'s zero-shot path) vs ``clip_benchmark eval``.

Same checkpoint, same images (the reference ``test`` split and every ``shift-*`` set, joined
into one labelled set: the same shard files serve both sides), same class names and prompt
templates (ours, written in the layout clip_benchmark reads), same batch size, fp32 on both
(clip_benchmark's ``--no_amp``), same data workers and intra-op threads. Each side runs in a
fresh process; the timed span, on both, is everything after the imports: load the checkpoint,
read and decode the images, build the prompt-ensemble classifier, classify every image.

    .venv/bin/python bench/bench_eval.py [--repeats 3] [--checkpoint PATH]
    .venv/bin/python bench/bench_eval.py --smoke   # seconds: toy checkpoint, tiny world

Both sides load the checkpoint into the architecture it records (ours: ``load_pretrained``;
the peer: registered with open_clip under the recorded name, see ``arch.py``).

Reports images/s of both and both top-1 accuracies, which must agree within 0.5 points.
Internal: ``--side ours|peer|standin`` runs one side and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import arch
import common as C
import smoke

NAME = "eval"
EVAL_SETS = ("test", "shift-")  # the reference test split, then every shift
PIPELINE_CHECKPOINT = C.REPO / "models" / "pretrain" / "diverse" / "checkpoint.pt"
SMOKE = dict(smoke.TOY_PRETRAIN)  # pretrain a toy checkpoint fast (--train-*)
PEER_TOOLS = {  # by the side that plays the peer
    "peer": "clip_benchmark eval 1.6.2 (wds dataset, --no_amp)",
    "standin": "stock open_clip on the same wds files (smoke stand-in: no clip_benchmark)",
}


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint is evaluated (``find_checkpoint``); bench_wiseft shares them."""
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="clipshift checkpoint (default: the pipeline's models/pretrain/diverse)",
    )
    p.add_argument(
        "--model",
        help="architecture pretrained when no checkpoint is found (default: the project's "
        "default pretraining model)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=15360,
        help="if no checkpoint is found, pretrain one on pool-diverse for this many samples",
    )
    p.add_argument(
        "--train-batch-size", type=int, default=128, help="its batch size (pretrain.batch_size)"
    )


def parser() -> argparse.ArgumentParser:
    p = C.base_parser(__doc__.splitlines()[0], C.WORK_DIR / "eval")
    add_checkpoint_args(p)
    p.add_argument("--batch-size", type=int, default=256, help="evaluate.batch_size")
    p.add_argument("--workers", type=int, default=1, help="evaluate.workers")
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--side", choices=["ours", "peer", "standin"], help=argparse.SUPPRESS)
    p.add_argument("--evalset", type=Path, help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------------------------
# inputs shared by both sides


def default_templates() -> list[str]:
    """The finetune stage's prompt templates (params.yaml, else the config default)."""
    from clipshift.config import FinetuneConfig, load_params

    params = C.REPO / "params.yaml"
    return list(
        load_params(params).finetune.templates if params.exists() else FinetuneConfig().templates
    )


def find_checkpoint(args, work_dir: Path) -> Path:
    """--checkpoint; else the pipeline's diverse model (not in smoke mode: a toy stands in);
    else one this script pretrained before for --model; else pretrain one now."""
    if args.checkpoint:
        if not args.checkpoint.exists():
            raise SystemExit(f"checkpoint {args.checkpoint} not found")
        return snapshot(args.checkpoint, work_dir)
    if PIPELINE_CHECKPOINT.exists() and not args.smoke:
        return snapshot(PIPELINE_CHECKPOINT, work_dir)
    # one folder per architecture: a checkpoint of an earlier default is never picked up
    return pretrain_checkpoint(args, work_dir / "model" / Path(args.model).name)


def pretrain_checkpoint(args, out_dir: Path) -> Path:
    """``--model`` pretrained on pool-diverse (the pretrain stage's code path), or the one an
    earlier run left in ``out_dir``."""
    path = out_dir / "diverse" / "checkpoint.pt"
    if path.exists():
        return path
    from clipshift.config import PretrainConfig
    from clipshift.stages.pretrain import run_pretrain

    C.say(f"no checkpoint found: pretraining {args.model} ({args.train_samples} samples)…")
    cfg = PretrainConfig(
        data_dir=str(args.data_dir),
        out_dir=str(out_dir),
        pools=["diverse"],
        model=args.model,
        samples=args.train_samples,
        batch_size=args.train_batch_size,
        checkpoint_every=10**9,
    )
    run_pretrain(cfg, "diverse", progress=False)
    return path


def snapshot(path: Path, work_dir: Path) -> Path:
    """A private copy (with its checksum sidecar), so both sides read the same bytes even if
    the pipeline rewrites its model meanwhile."""
    if path.resolve().is_relative_to(work_dir.resolve()):
        return path
    dst = work_dir / "checkpoint" / path.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    for src in path.parent.glob(path.name + "*"):  # checkpoint.pt, .sha256
        shutil.copy2(src, dst.parent / src.name)
    return dst


def eval_sources(data_dir: Path) -> list[Path]:
    names = sorted(p.parent.name for p in data_dir.glob("*/dataset.json"))
    chosen = [n for n in names if n == "test" or n.startswith("shift-")]
    if "test" not in chosen:
        raise SystemExit(f"no 'test' dataset in {data_dir}: run `dvc repro fetch`")
    return [data_dir / n for n in chosen]


def build_evalset(data_dir: Path, out: Path, templates: list[str]) -> tuple[Path, Path, int]:
    """One labelled set in two layouts over the same shard files.

    ``out/clipshift``: a clipshift dataset (dataset.json + shard-*.tar, png + cls), read by
    ``load_labelled``. ``out/wds``: clip_benchmark's webdataset layout (``test/{i}.tar``
    symlinked to those shards, ``nshards.txt``, ``classnames.txt``, and
    ``zeroshot_classification_templates.txt``: our templates with ``{}`` → ``{c}``, the
    placeholder clip_benchmark fills).
    """
    from clipshift.data.shards import DatasetInfo, ShardWriter, iter_dataset, load_info

    ours, wds = out / "clipshift", out / "wds"
    sources = eval_sources(data_dir)
    classes = load_info(sources[0]).classes
    if (ours / "dataset.json").exists() and (wds / "classnames.txt").exists():
        info = load_info(ours)
        if info.extra.get("sources") == [str(s) for s in sources]:
            return ours, wds, info.num_samples
    info = DatasetInfo(
        name="bench-eval",
        role="test",
        num_samples=0,
        classes=classes,
        image_size=load_info(sources[0]).image_size,
        source="bench",
        extra={"sources": [str(s) for s in sources]},
    )
    with ShardWriter(ours, info, shard_size=2000) as writer:
        for j, src in enumerate(sources):
            if load_info(src).classes != classes:
                raise SystemExit(f"{src} has other classes than {sources[0]}")
            for sample in iter_dataset(src):
                fmt = (sample["image"].format or "png").lower()
                writer.write(
                    {
                        "__key__": f"d{j}-{sample['__key__']}",
                        fmt: sample["image_bytes"],
                        "cls": sample["cls"],
                    }
                )
    info = load_info(ours)
    shutil.rmtree(wds, ignore_errors=True)
    (wds / "test").mkdir(parents=True)
    for i, shard in enumerate(info.shards):
        (wds / "test" / f"{i}.tar").symlink_to((ours / shard.file).resolve())
    (wds / "test" / "nshards.txt").write_text(f"{len(info.shards)}\n")
    (wds / "classnames.txt").write_text("\n".join(classes) + "\n")
    peer_templates = [t.replace("{}", "{c}") for t in templates]
    (wds / "zeroshot_classification_templates.txt").write_text("\n".join(peer_templates) + "\n")
    return ours, wds, info.num_samples


# --------------------------------------------------------------------------------------------
# the two sides


def run_ours(args) -> dict[str, Any]:
    import torch

    from clipshift.data.loaders import load_labelled
    from clipshift.methods.metrics import accuracy
    from clipshift.methods.zeroshot import zeroshot_classifier
    from clipshift.models import load_pretrained

    torch.set_num_threads(args.threads)
    templates = json.loads((args.evalset / "templates.json").read_text())
    t0 = time.perf_counter()
    bundle = load_pretrained(args.checkpoint)
    t1 = time.perf_counter()
    data = load_labelled(args.evalset / "clipshift")
    t2 = time.perf_counter()
    clf = zeroshot_classifier(bundle, data.classes, templates, args.batch_size)
    t3 = time.perf_counter()
    acc = accuracy(clf, data, args.batch_size)
    t4 = time.perf_counter()
    return {
        "model": bundle.name,
        "seconds": t4 - t0,
        "images": len(data),
        "accuracy": acc * 100,
        "breakdown_s": {"model": t1 - t0, "data": t2 - t1, "head": t3 - t2, "classify": t4 - t3},
        "threads": torch.get_num_threads(),
    }


def run_peer(args) -> dict[str, Any]:
    import torch
    from clip_benchmark import cli

    # the peer learns the architecture the checkpoint records, under the recorded name
    model = arch.peer_checkpoint_model(args.checkpoint, args.work_dir / "model_configs")
    torch.set_num_threads(args.threads)
    output = args.work_dir / "peer-result.json"
    output.unlink(missing_ok=True)
    argv = [
        "eval",
        "--dataset", "wds/clipshift_bench",
        "--dataset_root", str(args.evalset / "wds"),
        "--task", "zeroshot_classification",
        "--model", model,
        "--pretrained", str(args.checkpoint),
        "--batch_size", str(args.batch_size),
        "--num_workers", str(args.workers),
        "--no_amp",
        "--output", str(output),
        "--quiet",
    ]  # fmt: skip
    sys.argv = ["clip_benchmark", *argv]
    _, base = cli.get_parser_args()
    t0 = time.perf_counter()
    cli.main_eval(base)
    seconds = time.perf_counter() - t0
    metrics = json.loads(output.read_text())["metrics"]
    images = json.loads((args.evalset / "clipshift" / "dataset.json").read_text())["num_samples"]
    return {
        "model": model,
        "seconds": seconds,
        "images": images,
        "accuracy": metrics["acc1"] * 100,
        "mean_per_class_recall": metrics.get("mean_per_class_recall"),
        "threads": torch.get_num_threads(),
    }


def run_standin(args) -> dict[str, Any]:
    """The peer's place in a smoke run without clip_benchmark: stock open_clip on the same
    files, doing what clip_benchmark does — load the checkpoint with
    ``open_clip.create_model_and_transforms`` under the recorded architecture (the call that
    failed when the name was hard-coded), build open_clip's zero-shot classifier from the
    layout's class names and templates, classify the tar shards with open_clip's transforms."""
    import open_clip
    import torch

    model_name = arch.peer_checkpoint_model(args.checkpoint, args.work_dir / "model_configs")
    torch.set_num_threads(args.threads)
    wds = args.evalset / "wds"
    t0 = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(args.checkpoint)
    )
    model.eval()
    classes = (wds / "classnames.txt").read_text().splitlines()
    lines = (wds / "zeroshot_classification_templates.txt").read_text().splitlines()
    templates = [t.replace("{c}", "{}") for t in lines]  # back to str.format's placeholder
    correct = total = 0
    with torch.no_grad():
        tokenizer = open_clip.get_tokenizer(model_name)
        head = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates)
        for images, labels in wds_batches(wds / "test", preprocess, args.batch_size):
            logits = model.encode_image(images, normalize=True) @ head
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += len(labels)
    return {
        "model": model_name,
        "seconds": time.perf_counter() - t0,
        "images": total,
        "accuracy": 100 * correct / total,
        "threads": torch.get_num_threads(),
    }


def wds_batches(shard_dir: Path, preprocess, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """(images, labels) batches of the clip_benchmark layout's shards ``0.tar``, ``1.tar``, …"""
    import torch
    from PIL import Image

    images, labels = [], []
    shards = sorted(shard_dir.glob("*.tar"), key=lambda path: int(path.stem))
    for sample in itertools.chain.from_iterable(map(tar_samples, shards)):
        image = next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg", "webp"))
        images.append(preprocess(Image.open(io.BytesIO(image)).convert("RGB")))
        labels.append(int(sample["cls"]))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def tar_samples(shard: Path) -> Iterator[dict[str, bytes]]:
    """A webdataset shard's samples: ``{extension: bytes}`` per key (a sample's files are
    consecutive; the key is the name up to its first dot, as webdataset splits it)."""
    with tarfile.open(shard) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
        for _, group in itertools.groupby(files, key=lambda m: m.name.split(".", 1)[0]):
            yield {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in group}


# --------------------------------------------------------------------------------------------
# the comparison


def side_cmd(args, side: str, checkpoint: Path) -> list[str]:
    python = C.OURS_PYTHON if side == "ours" else args.peer_python
    role = side if side == "ours" else args.peer_side
    return [
        str(python), str(Path(__file__).resolve()), "--side", role,
        "--checkpoint", str(checkpoint), "--evalset", str(args.work_dir / "evalset"),
        "--work-dir", str(args.work_dir), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--threads", str(args.threads),
    ]  # fmt: skip


def choose_peer(args) -> None:
    """The peer's python, and what plays the peer: clip_benchmark where that python has it,
    else (smoke runs only) ``run_standin``."""
    args.peer_python = C.peer_python(args.smoke)
    has_peer = args.peer_python == C.PEER_PYTHON or importlib.util.find_spec("clip_benchmark")
    args.peer_side = "peer" if has_peer else "standin"


def compare(args) -> dict[str, Any]:
    choose_peer(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = find_checkpoint(args, args.work_dir)
    templates = default_templates()
    evalset = args.work_dir / "evalset"
    _, _, n_images = build_evalset(args.data_dir, evalset, templates)
    (evalset / "templates.json").write_text(json.dumps(templates))
    env = C.thread_env(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}

    def side(name: str):
        def run(i: int) -> float:
            log = args.work_dir / f"{name}-r{i}.log"
            out = C.run_json(side_cmd(args, name, checkpoint), env=env, log_file=log)
            runs[name].append(out)
            return out["images"] / out["seconds"]

        return run

    load_start = C.machine_info()["load_average"]
    values = C.alternate({"ours": side("ours"), "peer": side("peer")}, args.repeats, C.say)
    ours_acc = runs["ours"][0]["accuracy"]
    peer_acc = runs["peer"][0]["accuracy"]
    gap = abs(ours_acc - peer_acc)
    return C.build_result(
        values["ours"],
        values["peer"],
        "images/s (incl. checkpoint load, decoding and the zero-shot head; ratio = ours/peer, "
        "higher is better)",
        target=1.0,
        peer_tool=PEER_TOOLS[args.peer_side],
        model=runs["ours"][0]["model"],
        peer_model=runs["peer"][0]["model"],
        checkpoint=str(checkpoint),
        images=n_images,
        datasets=[p.name for p in eval_sources(args.data_dir)],
        classes=len((evalset / "wds" / "classnames.txt").read_text().splitlines()),
        templates=templates,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        precision="fp32",
        ours_accuracy=ours_acc,
        peer_accuracy=peer_acc,
        accuracy_gap_points=gap,
        accuracy_agree=gap <= args.tolerance,
        accuracy_tolerance_points=args.tolerance,
        ours_breakdown_s=runs["ours"][0].get("breakdown_s"),
        ours_seconds=[r["seconds"] for r in runs["ours"]],
        peer_seconds=[r["seconds"] for r in runs["peer"]],
        load_average_start=load_start,
        machine=C.machine_info(args.threads),
        smoke=args.smoke,
    )


SIDES = {"ours": run_ours, "peer": run_peer, "standin": run_standin}


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(parser(), argv, SMOKE)
    if args.side:
        C.emit(SIDES[args.side](args))
        return 0
    smoke.prepare(args)
    args.model = args.model or arch.default_model()
    result = compare(args)
    path = C.write_result(NAME, result, args.results_dir)
    print(C.summary_line(NAME, result))
    print(
        f"accuracy: ours {result['ours_accuracy']:.2f}% vs peer {result['peer_accuracy']:.2f}% "
        f"({'agree' if result['accuracy_agree'] else 'DISAGREE'})"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
