"""Data loading vs the training step's demand, at the default worker count.

ours = the webdataset streaming loader (``loaders.pool_loader``: shard read + PNG decode +
tokenize + crop-augment + normalise, batched inside ``pretrain.workers`` worker processes);
peer = what the training step consumes (samples/s of ``Pretrainer.optimizer_step`` on
ready-made batches: forward, backward, clip, AdamW; no data loading). ratio = loader /
demand: ≥ 1 means the loader is not the bottleneck. The in-memory loader (the default for
pools that fit in RAM, which the built-in pools do) is measured too: its batch assembly rate
and its one-off decode of the pool.

Both are measured in isolation, alternating; during training they share the CPU, so the
ratio needed in practice is above 1 by the loader's share of the cores.

The model is ``--model``, by default the project's default pretraining model, with the
stage's default batch size and worker count.

    .venv/bin/python bench/bench_loader.py [--repeats 3] [--model NAME]
    .venv/bin/python bench/bench_loader.py --smoke   # seconds: toy model, tiny world
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import arch
import common as C
import smoke

NAME = "loader"
# --smoke: a few batches of 16 (the tiny pool has 80 pairs), a few steps of the toy model
SMOKE = {"batch_size": 16, "batches": 3, "warmup_batches": 1, "steps": 2, "warmup_steps": 1}


def parser() -> argparse.ArgumentParser:
    p = C.base_parser(__doc__.splitlines()[0], C.WORK_DIR / "loader")
    p.add_argument("--pool", default="diverse")
    p.add_argument(
        "--model",
        help="architecture trained (default: the project's default pretraining model)",
    )
    p.add_argument("--batch-size", type=int, help="default: pretrain.batch_size")
    p.add_argument("--workers", type=int, help="loader workers (default: pretrain.workers)")
    p.add_argument("--batches", type=int, default=30, help="batches timed per repeat")
    p.add_argument("--warmup-batches", type=int, default=20, help="batches left out first")
    p.add_argument("--steps", type=int, default=12, help="training steps timed per repeat")
    p.add_argument("--warmup-steps", type=int, default=3)
    return p


def config(args):
    from clipshift.config import PretrainConfig

    defaults = PretrainConfig()
    return PretrainConfig(
        data_dir=str(args.data_dir),
        out_dir=str(args.work_dir / "unused"),
        pools=[args.pool],
        model=args.model,
        batch_size=args.batch_size or defaults.batch_size,
        workers=defaults.workers if args.workers is None else args.workers,
    )


def stream_rate(args, cfg, bundle) -> float:
    """Samples/s of a fresh streaming loader after its warm-up batches (worker start,
    shuffle-buffer fill)."""
    from clipshift.data import loaders

    loader = loaders.pool_loader(
        args.data_dir / f"pool-{args.pool}",
        bundle.tokenizer,
        bundle.image_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        workers=cfg.workers,
    )
    it = iter(loader)
    for _ in range(args.warmup_batches):
        next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        images, tokens = next(it)
    seconds = time.perf_counter() - start
    del it, loader  # stop the workers before the other side runs
    return args.batches * cfg.batch_size / seconds


def memory_rate(args, cfg, batches) -> float:
    """Samples/s of the in-memory loader's batch assembly (index, crop, normalise)."""
    start = time.perf_counter()
    for step in range(args.batches):
        batches.micro_batches(step)
    return args.batches * cfg.batch_size / (time.perf_counter() - start)


def step_rate(args, cfg, trainer, micro) -> float:
    """Samples/s of optimizer steps on one ready batch (steady state after warm-up)."""
    for _ in range(args.warmup_steps):
        trainer.optimizer_step(micro)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.optimizer_step(micro)
    return args.steps * cfg.batch_size / (time.perf_counter() - start)


def compare(args) -> dict[str, Any]:
    import torch

    from clipshift.data import loaders
    from clipshift.data.batches import MemoryBatches
    from clipshift.stages.pretrain import Pretrainer
    from clipshift.tracking_api import NullTracker

    torch.set_num_threads(args.threads)
    cfg = config(args)
    trainer = Pretrainer(cfg, args.pool, NullTracker(), False, None)
    torch.set_num_threads(args.threads)
    bundle = trainer.bundle
    start = time.perf_counter()
    pool = loaders.load_pool(
        args.data_dir / f"pool-{args.pool}", bundle.tokenizer, bundle.image_size
    )
    decode_s = time.perf_counter() - start
    batches = MemoryBatches(pool, cfg, trainer.dist, bundle.image_size)
    micro = batches.micro_batches(0)
    trainer.raw.train()

    load_start = C.machine_info()["load_average"]
    values = C.alternate(
        {
            "stream": lambda i: stream_rate(args, cfg, bundle),
            "step": lambda i: step_rate(args, cfg, trainer, micro),
            "memory": lambda i: memory_rate(args, cfg, batches),
        },
        args.repeats,
        C.say,
    )
    mem_ratios = C.paired_ratios(values["memory"], values["step"])
    return C.build_result(
        values["stream"],
        values["step"],
        "samples/s (ours = webdataset loader read+decode+augment, peer = training step demand; "
        "ratio = loader / demand, ≥ 1 means the loader keeps up; higher is better)",
        target=1.0,
        workers=cfg.workers,
        batch_size=cfg.batch_size,
        model=trainer.bundle.name,
        pool=args.pool,
        threads=args.threads,
        loader_default=trainer_loader_kind(cfg, args),
        memory_loader_samples_per_s=C.median(values["memory"]),
        memory_loader_ratio=C.median(values["memory"]) / C.median(values["step"]),
        memory_loader_spread=C.spread(mem_ratios),
        memory_pool_decode_s=decode_s,
        memory_pool_samples=len(pool),
        load_average_start=load_start,
        machine=C.machine_info(args.threads),
        smoke=args.smoke,
    )


def trainer_loader_kind(cfg, args) -> str:
    from clipshift.models import resolve_model_config
    from clipshift.stages.pretrain import choose_loader

    _, model_cfg = resolve_model_config(cfg.model)
    size = model_cfg["vision_cfg"]["image_size"]
    return choose_loader(cfg, args.data_dir / f"pool-{args.pool}", size)


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(parser(), argv, SMOKE)
    smoke.prepare(args)
    args.model = args.model or arch.default_model()
    result = compare(args)
    path = C.write_result(NAME, result, args.results_dir)
    print(C.summary_line(NAME, result))
    print(
        f"in-memory loader: {result['memory_loader_samples_per_s']:.4g} samples/s = "
        f"{result['memory_loader_ratio']:.2f}× demand "
        f"(pool decode {result['memory_pool_decode_s']:.1f} s)"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
