"""Independent runs side by side on the CPU: one worker process per core, one thread each.

A step of these small models parallelises poorly across threads: on the 2-core development
machine a pretrain step took 0.52 s on one thread and 0.42 s on two, while two one-thread
runs side by side each kept 0.52 s, i.e. 1.6x the throughput of running them one after the
other on two threads. A stage with independent runs (the pools, the baselines, the scaling
grid) therefore hands them to :func:`run_side_by_side`.

Each run gets a :class:`~clipshift.tracking_api.RecordingTracker` in its worker; what it
logged is replayed into the caller's tracker when it ends, as the torchrun launcher does
(:mod:`clipshift.distributed`), so MLflow holds what an in-process run gives it. Runs must
be importable functions with picklable arguments and results. With one worker (one core, a
GPU, or a single run) they run in this process, one after the other, on the caller's
tracker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from clipshift import train_utils as T
from clipshift.progress import BAR_POSITION_ENV
from clipshift.tracking_api import NullTracker, RecordingTracker, Tracker, replay

WORKERS_ENV = "CLIPSHIFT_WORKERS"  # caps the workers (1: everything in this process)


@dataclass
class Run:
    """``entry(**kwargs, tracker=...)``; what it logs goes to ``tracker``."""

    entry: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tracker: Tracker | None = None
    cost: float = 1.0  # relative; the costliest runs start first, so the workers end together


def worker_count(runs: int, device: str | torch.device = "cpu") -> int:
    """How many runs to put side by side: one per core on the CPU (capped by
    ``CLIPSHIFT_WORKERS`` and by the number of runs); one on an accelerator, whose runs would
    only queue for it."""
    if torch.device(device).type != "cpu":
        return 1
    cap = os.environ.get(WORKERS_ENV, "")
    cores = int(cap) if cap.isdigit() and int(cap) > 0 else T.available_cpus()
    return max(1, min(runs, cores))


def run_side_by_side(runs: Sequence[Run], workers: int) -> list[Any]:
    """The results of ``runs``, in order. With ``workers`` > 1 each run goes to a spawned
    worker process with ``cores // workers`` threads; the first failure is raised here once
    the runs already started have ended (their outputs stay consistent on disk)."""
    if workers <= 1:
        return [run.entry(**run.kwargs, tracker=run.tracker or NullTracker()) for run in runs]
    threads = max(1, T.available_cpus() // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or locks
    positions = context.Queue()
    for position in range(workers):
        positions.put(position)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads, positions)
    ) as pool:
        order = sorted(range(len(runs)), key=lambda i: -runs[i].cost)  # stable among equals
        submitted = {i: pool.submit(_run_recorded, runs[i].entry, runs[i].kwargs) for i in order}
        futures = [submitted[i] for i in range(len(runs))]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()  # a failure: the runs not yet started do not start
    # leaving the block waited for the runs already started
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise cast(BaseException, future.exception())
    results = []
    for run, future in zip(runs, futures, strict=True):
        result, recorded = future.result()
        replay(recorded, run.tracker or NullTracker())
        results.append(result)
    return results


def _init_worker(threads: int, positions: Any) -> None:
    # OMP_NUM_THREADS is what train_utils.set_threads honours inside the stages' run functions
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[BAR_POSITION_ENV] = str(positions.get())
    torch.set_num_threads(threads)


def _run_recorded(entry: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Any, dict]:
    recorder = RecordingTracker()
    result = entry(**kwargs, tracker=recorder)
    return result, recorder.dump()
