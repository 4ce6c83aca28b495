"""Runs side by side in worker processes (clipshift.parallel): results in order, what each run
logged reaches its tracker, a failure surfaces, and the cores are split between workers."""

from __future__ import annotations

import os
import time

import pytest
import torch

from clipshift import parallel
from clipshift.errors import DataError
from clipshift.tracking_api import RecordingTracker
from clipshift.train_utils import available_cpus


def square_in_worker(x: int, tracker) -> dict:
    tracker.log_metrics({"x": float(x)}, step=x)
    tracker.set_tags({"ran": str(x)})
    return {"square": x * x, "pid": os.getpid(), "threads": torch.get_num_threads()}


def start_then_wait(x: int, tracker) -> tuple[int, float]:
    began = time.monotonic()  # one clock for every process on Linux
    time.sleep(0.3)
    return x, began


def fail_on_two(x: int, tracker) -> int:
    if x == 2:
        raise DataError(f"run {x} found bad data")
    return x


def test_runs_go_to_workers_and_their_logs_to_their_trackers():
    trackers = [RecordingTracker() for _ in range(3)]
    runs = [
        parallel.Run(square_in_worker, {"x": x}, t)
        for x, t in zip([1, 2, 3], trackers, strict=True)
    ]
    results = parallel.run_side_by_side(runs, workers=2)
    assert [r["square"] for r in results] == [1, 4, 9]
    assert all(r["pid"] != os.getpid() for r in results)
    assert {r["threads"] for r in results} == {max(1, available_cpus() // 2)}
    for x, tracker in zip([1, 2, 3], trackers, strict=True):
        assert tracker.metrics == [(x, {"x": float(x)})] and tracker.tags == {"ran": str(x)}


def test_one_worker_runs_in_this_process_on_the_callers_tracker():
    tracker = RecordingTracker()
    [result] = parallel.run_side_by_side([parallel.Run(square_in_worker, {"x": 4}, tracker)], 1)
    assert result["pid"] == os.getpid() and tracker.metrics == [(4, {"x": 4.0})]


def test_a_failing_run_raises_its_error():
    runs = [parallel.Run(fail_on_two, {"x": x}) for x in (1, 2, 3)]
    with pytest.raises(DataError, match="run 2 found bad data"):
        parallel.run_side_by_side(runs, workers=2)


def test_worker_count(monkeypatch):
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    assert parallel.worker_count(10) == min(10, available_cpus())
    assert parallel.worker_count(1) == 1
    assert parallel.worker_count(10, "meta") == 1  # an accelerator: runs queue for it anyway
    monkeypatch.setenv(parallel.WORKERS_ENV, "1")
    assert parallel.worker_count(10) == 1


def test_costliest_runs_start_first_and_results_keep_their_order():
    costs = {1: 1.0, 2: 5.0, 3: 3.0}  # submitted as 2, 3, then 1 once a worker is free
    runs = [parallel.Run(start_then_wait, {"x": x}, cost=c) for x, c in costs.items()]
    started = parallel.run_side_by_side(runs, workers=2)
    assert [x for x, _ in started] == [1, 2, 3]
    start = dict(started)
    assert start[2] < start[1] and start[3] < start[1]  # the cheapest started last,
    assert start[1] >= min(start[2], start[3]) + 0.25  # once a worker was free again
