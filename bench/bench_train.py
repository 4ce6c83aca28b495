"""Training throughput: clipshift ``pretrain`` vs ``open_clip_train.main``, same run.

Both sides train the same architecture (``--model``, by default the project's default
pretraining model; the peer learns it through ``open_clip.add_model_config``) from scratch on
the same webdataset shards (``pool-<pool>``) with the same batch size, precision, optimizer
settings, data workers and intra-op thread count, each in a fresh process, alternating A/B.
Throughput is steady state: samples/s over the logged windows after the first
``--skip-steps`` steps, read from each side's own log (ours: the per-log-step ``throughput``
run_pretrain returns; the peer: its ``out.log`` "Batch (t)" lines). Process start-up, pool
decoding and checkpoint writes are outside the windows; their cost is reported as wall time.

    .venv/bin/python bench/bench_train.py [--repeats 3] [--samples 7680] [--model NAME]
    .venv/bin/python bench/bench_train.py --smoke   # seconds: toy model, tiny world

Internal: ``--side ours|peer`` runs one side (the peer side under bench/.peer-venv/bin/python)
and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import arch
import common as C
import smoke

NAME = "train"
# --smoke: 4 steps of 16 on the tiny pool, rates from step 1 on, no worker process to start
SMOKE = {"samples": 64, "batch_size": 16, "log_every": 1, "skip_steps": 1, "workers": 0}
PEER_TOOLS = {  # by the peer's data (--peer-data)
    "webdataset": "open_clip_train.main (open_clip_torch 3.3.0, webdataset 0.2.86)",
    "synthetic": "open_clip_train.main in the project venv on synthetic data (smoke stand-in)",
}
# open_clip_train logs "... [ 1280/7680 (17%)] Data (t): 0.012 Batch (t): 0.553, 231.4/s ..."
PEER_LOG = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)"
)


def parser() -> argparse.ArgumentParser:
    p = C.base_parser(__doc__.splitlines()[0], C.WORK_DIR / "train")
    p.add_argument(
        "--model",
        help="architecture both sides train: open_clip name or config JSON path (default: the "
        "project's default pretraining model)",
    )
    p.add_argument("--samples", type=int, default=3840, help="samples per run (30 steps)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--workers", type=int, default=1, help="data workers (pretrain.workers)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--skip-steps", type=int, default=10, help="warm-up steps left out")
    p.add_argument("--pool", default="diverse")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--peer-data",
        choices=["webdataset", "synthetic"],
        default="webdataset",
        help=argparse.SUPPRESS,
    )
    return p


# --------------------------------------------------------------------------------------------
# ours


def history_windows(history: list[dict[str, Any]], batch_size: int) -> list[tuple[int, int, float]]:
    """(start_step, steps, seconds) per logged record ({step, samples_per_s}) of clipshift's
    per-step throughput (run_pretrain's ``throughput``; history.json holds no timings)."""
    windows, prev = [], 0
    for rec in history:
        steps = int(rec["step"]) - prev
        if steps > 0 and rec.get("samples_per_s"):
            windows.append((prev, steps, steps * batch_size / float(rec["samples_per_s"])))
        prev = int(rec["step"])
    return windows


def run_ours(args) -> dict[str, Any]:
    import torch

    from clipshift.config import PretrainConfig
    from clipshift.models import resolve_model_config
    from clipshift.stages.pretrain import run_pretrain

    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        data_dir=str(args.data_dir),
        out_dir=str(args.run_dir),
        pools=[args.pool],
        model=args.model,
        samples=args.samples,
        batch_size=args.batch_size,
        precision=args.precision,
        workers=args.workers,
        log_every=args.log_every,
        checkpoint_every=10**9,  # the peer checkpoints once per epoch: only at the end here
        seed=0,
    )
    start = time.perf_counter()
    metrics = run_pretrain(cfg, args.pool, progress=False)
    wall = time.perf_counter() - start
    windows = history_windows(metrics["throughput"], args.batch_size)
    name, config = resolve_model_config(args.model)
    return {
        "model": name,
        "model_config": config,
        "samples_per_s": C.steady_rate(windows, args.batch_size, args.skip_steps),
        "best_window": max(C.window_rates(windows, args.batch_size, args.skip_steps)),
        "wall_s": wall,
        "train_time_s": metrics.get("train_time_s"),
        "loader": metrics.get("loader"),
        "final_loss": metrics.get("final_loss"),
        "threads": torch.get_num_threads(),
        "checkpoint": str(args.run_dir / args.pool / "checkpoint.pt"),
    }


# --------------------------------------------------------------------------------------------
# the peer


def brace_pattern(pool_dir: Path) -> str:
    """The pool's shards as one webdataset brace pattern (shard-000000..shard-00000N)."""
    info = json.loads((pool_dir / "dataset.json").read_text())
    files = [s["file"] for s in info["shards"]]
    expected = [f"shard-{i:06d}.tar" for i in range(len(files))]
    if files != expected:
        raise SystemExit(f"{pool_dir}: shards are not shard-000000..: {files[:3]}…")
    if len(files) == 1:
        return str(pool_dir / files[0])
    return str(pool_dir / f"shard-{{000000..{len(files) - 1:06d}}}.tar")


def peer_data_argv(args) -> list[str]:
    if args.peer_data == "synthetic":
        # smoke run without the peer venv: the project venv's webdataset 1.x cannot feed
        # open_clip_train (KeyError: 'fname'), so the peer trains on its own random images;
        # its model set-up, training loop and log (what the parsing reads) are still the same
        return ["--dataset-type", "synthetic"]
    pattern = brace_pattern(args.data_dir / f"pool-{args.pool}")
    return ["--train-data", pattern, "--dataset-type", "webdataset"]


def peer_argv(args, model: str, logs: Path) -> list[str]:
    return [
        *peer_data_argv(args),
        "--train-num-samples", str(args.samples),
        "--model", model,
        "--batch-size", str(args.batch_size),
        "--epochs", "1",
        "--workers", str(args.workers),
        "--precision", "fp32" if args.precision == "fp32" else "amp_bf16",
        "--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", "20",
        "--grad-clip-norm", "1.0",
        "--seed", "0",
        "--log-every-n-steps", str(args.log_every),
        "--zeroshot-frequency", "0",
        "--val-frequency", "0",
        "--save-frequency", "1",
        "--report-to", "",
        "--logs", str(logs),
        "--name", "run",
    ]  # fmt: skip


def peer_windows(log_text: str, batch_size: int) -> list[tuple[int, int, float]]:
    """(start_step, steps, seconds) per "Train Epoch" line of open_clip_train's log.

    Each line's "Batch (t)" is the mean step time since the previous line (its meter resets),
    and its sample count says how many steps are done.
    """
    windows, prev = [], 0
    for match in PEER_LOG.finditer(log_text):
        done = int(match.group(1)) // batch_size
        steps = done - prev
        if steps > 0:
            windows.append((prev, steps, steps * float(match.group(3))))
        prev = done
    return windows


def run_peer(args) -> dict[str, Any]:
    import torch

    model = arch.peer_model(args.model)  # the peer learns the architecture
    from open_clip_train import main as peer_main

    torch.set_num_threads(args.threads)
    logs = args.run_dir / "logs"
    start = time.perf_counter()
    peer_main.main(peer_argv(args, model, logs))
    wall = time.perf_counter() - start
    text = (logs / "run" / "out.log").read_text()
    windows = peer_windows(text, args.batch_size)
    losses = re.findall(r"Contrastive_loss: ([\d.]+)", text)
    return {
        "samples_per_s": C.steady_rate(windows, args.batch_size, args.skip_steps),
        "best_window": max(C.window_rates(windows, args.batch_size, args.skip_steps)),
        "wall_s": wall,
        "final_loss": float(losses[-1]) if losses else None,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# the comparison


def side_cmd(args, side: str, run_dir: Path) -> list[str]:
    python = C.OURS_PYTHON if side == "ours" else args.peer_python
    return [
        str(python), str(Path(__file__).resolve()), "--side", side, "--run-dir", str(run_dir),
        "--model", args.model, "--samples", str(args.samples),
        "--batch-size", str(args.batch_size), "--precision", args.precision,
        "--workers", str(args.workers), "--log-every", str(args.log_every),
        "--skip-steps", str(args.skip_steps), "--pool", args.pool,
        "--data-dir", str(args.data_dir), "--threads", str(args.threads),
        "--peer-data", args.peer_data,
    ]  # fmt: skip


def compare(args) -> dict[str, Any]:
    args.peer_python = C.peer_python(args.smoke)
    args.peer_data = "webdataset" if args.peer_python == C.PEER_PYTHON else "synthetic"
    env = C.thread_env(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}

    def side(name: str):
        def run(i: int) -> float:
            run_dir = args.work_dir / f"{name}-r{i}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed
            out = C.run_json(
                side_cmd(args, name, run_dir), env=env, log_file=run_dir.parent / f"{name}-r{i}.log"
            )
            runs[name].append(out)
            # keep the logs, drop the optimizer states (≈100 MB a run)
            shutil.rmtree(run_dir / args.pool / "resume", ignore_errors=True)
            shutil.rmtree(run_dir / "logs" / "run" / "checkpoints", ignore_errors=True)
            return out["samples_per_s"]

        return run

    load_start = C.machine_info()["load_average"]
    values = C.alternate({"ours": side("ours"), "peer": side("peer")}, args.repeats, C.say)
    return C.build_result(
        values["ours"],
        values["peer"],
        "samples/s (steady state; ratio = ours/peer, higher is better)",
        target=1.0,
        peer_tool=PEER_TOOLS[args.peer_data],
        model=runs["ours"][0]["model"],
        model_config=runs["ours"][0]["model_config"],
        pool=args.pool,
        samples_per_run=args.samples,
        batch_size=args.batch_size,
        precision=args.precision,
        workers=args.workers,
        threads=args.threads,
        skip_steps=args.skip_steps,
        # the fastest logged window of each run: the least disturbed by other jobs
        ours_best_window=[r["best_window"] for r in runs["ours"]],
        peer_best_window=[r["best_window"] for r in runs["peer"]],
        best_window_ratio=C.median([r["best_window"] for r in runs["ours"]])
        / C.median([r["best_window"] for r in runs["peer"]]),
        ours_wall_s=[r["wall_s"] for r in runs["ours"]],
        peer_wall_s=[r["wall_s"] for r in runs["peer"]],
        ours_loader=runs["ours"][0].get("loader"),
        ours_final_loss=[r.get("final_loss") for r in runs["ours"]],
        peer_final_loss=[r.get("final_loss") for r in runs["peer"]],
        checkpoint=runs["ours"][-1].get("checkpoint"),
        load_average_start=load_start,
        machine=C.machine_info(args.threads),
        smoke=args.smoke,
    )


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(parser(), argv, SMOKE)
    if args.side == "ours":
        C.emit(run_ours(args))
        return 0
    if args.side == "peer":
        C.emit(run_peer(args))
        return 0
    smoke.prepare(args)
    args.model = args.model or arch.default_model()
    result = compare(args)
    path = C.write_result(NAME, result, args.results_dir)
    print(C.summary_line(NAME, result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
