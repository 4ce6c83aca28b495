"""Zero-shot evaluation: clipshift (``evaluate``'s zero-shot path) vs ``clip_benchmark eval``.

Same checkpoint, same images (the reference ``test`` split and every ``shift-*`` set, joined
into one labelled set: the same shard files serve both sides), same class names and prompt
templates (ours, written in the layout clip_benchmark reads), same batch size, fp32 on both
(clip_benchmark's ``--no_amp``), same data workers and intra-op threads. Each side runs in a
fresh process; the timed span, on both, is everything after the imports: load the checkpoint,
read and decode the images, build the prompt-ensemble classifier, classify every image.

    .venv/bin/python bench/bench_eval.py [--repeats 3] [--checkpoint PATH]

Reports images/s of both and both top-1 accuracies, which must agree within 0.5 points.
Internal: ``--side ours|peer`` runs one side and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import common as C

NAME = "eval"
MODEL = "clipshift-vit-tiny"
EVAL_SETS = ("test", "shift-")  # the reference test split, then every shift


def parser() -> argparse.ArgumentParser:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="open_clip checkpoint of clipshift-vit-tiny")
    p.add_argument(
        "--train-samples",
        type=int,
        default=15360,
        help="if no checkpoint is found, pretrain one on pool-diverse for this many samples",
    )
    p.add_argument("--batch-size", type=int, default=256, help="evaluate.batch_size")
    p.add_argument("--workers", type=int, default=1, help="evaluate.workers")
    p.add_argument("--data-dir", type=Path, default=C.DEFAULT_DATA)
    p.add_argument("--work-dir", type=Path, default=C.WORK_DIR / "eval")
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
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
    """--checkpoint; else the pipeline's diverse model; else one this script trained before;
    else pretrain one now (same code path as the pretrain stage)."""
    candidates = [args.checkpoint] if args.checkpoint else []
    candidates += [
        C.REPO / "models" / "pretrain" / "diverse" / "checkpoint.pt",
        work_dir / "model" / "diverse" / "checkpoint.pt",
    ]
    for path in candidates:
        if path and Path(path).exists():
            return snapshot(Path(path), work_dir)
    if args.checkpoint:
        raise SystemExit(f"checkpoint {args.checkpoint} not found")
    from clipshift.config import PretrainConfig
    from clipshift.pretrain import run_pretrain

    C.say(f"no checkpoint found: pretraining one ({args.train_samples} samples)…")
    cfg = PretrainConfig(
        data_dir=str(args.data_dir),
        out_dir=str(work_dir / "model"),
        pools=["diverse"],
        model=MODEL,
        samples=args.train_samples,
        checkpoint_every=10**9,
    )
    run_pretrain(cfg, "diverse", progress=False)
    return work_dir / "model" / "diverse" / "checkpoint.pt"


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
    from clipshift.evaluate import accuracy
    from clipshift.finetune import load_pretrained, zeroshot_classifier

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
        "seconds": t4 - t0,
        "images": len(data),
        "accuracy": acc * 100,
        "breakdown_s": {"model": t1 - t0, "data": t2 - t1, "head": t3 - t2, "classify": t4 - t3},
        "threads": torch.get_num_threads(),
    }


def run_peer(args) -> dict[str, Any]:
    import open_clip
    import torch

    open_clip.add_model_config(str(C.MODEL_CONFIGS))  # the peer learns our architecture
    from clip_benchmark import cli

    torch.set_num_threads(args.threads)
    output = args.work_dir / "peer-result.json"
    output.unlink(missing_ok=True)
    argv = [
        "eval",
        "--dataset", "wds/clipshift_bench",
        "--dataset_root", str(args.evalset / "wds"),
        "--task", "zeroshot_classification",
        "--model", MODEL,
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
        "seconds": seconds,
        "images": images,
        "accuracy": metrics["acc1"] * 100,
        "mean_per_class_recall": metrics.get("mean_per_class_recall"),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# the comparison


def side_cmd(args, side: str, checkpoint: Path) -> list[str]:
    python = C.OURS_PYTHON if side == "ours" else C.PEER_PYTHON
    return [
        str(python), str(Path(__file__).resolve()), "--side", side,
        "--checkpoint", str(checkpoint), "--evalset", str(args.work_dir / "evalset"),
        "--work-dir", str(args.work_dir), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--threads", str(args.threads),
    ]  # fmt: skip


def compare(args) -> dict[str, Any]:
    if not C.PEER_PYTHON.exists():
        raise SystemExit("no peer venv: run `bash bench/peer_env.sh` first")
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
        peer_tool="clip_benchmark eval 1.6.2 (wds dataset, --no_amp)",
        model=MODEL,
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
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.side == "ours":
        C.emit(run_ours(args))
        return 0
    if args.side == "peer":
        C.emit(run_peer(args))
        return 0
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
