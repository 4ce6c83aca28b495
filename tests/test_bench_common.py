"""bench/common.py: the statistics, A/B alternation and result JSON of the benchmarks (no
benchmark is run here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """Import bench/<name>.py (bench/ is scripts, not a package: they import `common` and
    their sibling helpers such as `arch`, found with bench/ first on sys.path meanwhile)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved = sys.modules.get("common")
    if name != "common":
        sys.modules["common"] = sys.modules["bench_common"]
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
        if saved is None:
            sys.modules.pop("common", None)
        else:
            sys.modules["common"] = saved
    return module


C = _load("common")


def test_median_and_spread():
    assert C.median([3.0, 1.0, 2.0]) == 2.0
    assert C.median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert C.spread([2.0, 5.0, 1.0]) == [1.0, 5.0]
    with pytest.raises(ValueError):
        C.median([])
    with pytest.raises(ValueError):
        C.spread([])


def test_paired_ratios_pair_repeats_and_refuse_mismatches():
    assert C.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="pair"):
        C.paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="0"):
        C.paired_ratios([1.0], [0.0])


def test_steady_rate_leaves_out_warmup_and_weights_by_time():
    # (start_step, steps, seconds); the first window is a slow warm-up
    windows = [(0, 1, 10.0), (1, 10, 10.0), (11, 10, 30.0)]
    # from step 1 on: 20 steps × 4 samples in 40 s = 2 samples/s (not the mean of 4 and 1.33)
    assert C.steady_rate(windows, batch_size=4, skip_steps=1) == pytest.approx(2.0)
    assert C.steady_rate(windows, batch_size=4, skip_steps=11) == pytest.approx(40 / 30)
    with pytest.raises(ValueError, match="skip"):
        C.steady_rate(windows, batch_size=4, skip_steps=50)
    assert C.window_rates(windows, 4, 1) == pytest.approx([4.0, 40 / 30])


def test_alternate_rotates_the_order_each_repeat():
    order = []

    def side(name):
        def run(i):
            order.append((i, name))
            return float(i)

        return run

    out = C.alternate({"a": side("a"), "b": side("b")}, repeats=3)
    assert out == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0]}
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    three = []
    C.alternate({k: (lambda i, k=k: three.append(k)) for k in "xyz"}, repeats=3)
    assert three == list("xyzyzxzxy")
    with pytest.raises(ValueError):
        C.alternate({"a": side("a")}, repeats=0)


def test_build_result_schema_ratio_and_target():
    r = C.build_result([200.0, 220.0, 180.0], [100.0, 100.0, 120.0], "samples/s", target=1.0)
    assert {"ours", "peer", "unit", "ratio", "repeats", "spread"} <= set(r)
    assert r["ours"] == 200.0 and r["peer"] == 100.0 and r["ratio"] == pytest.approx(2.0)
    assert r["repeats"] == 3
    assert r["spread"] == pytest.approx([1.5, 2.2])  # per-repeat ratios 2.0, 2.2, 1.5
    assert r["target_met"] is True and r["better"] == "higher"
    low = C.build_result([1.4], [1.0], "s", higher_is_better=False, target=1.3, note="x")
    assert low["target_met"] is False and low["better"] == "lower" and low["note"] == "x"


def test_write_result_is_valid_json_and_checks_the_schema(tmp_path):
    r = C.build_result([2.0], [1.0], "x/s", extra_field=[1, 2])
    path = C.write_result("demo", r, tmp_path)
    assert path == tmp_path / "demo.json"
    back = json.loads(path.read_text())
    assert back["ratio"] == 2.0 and back["spread"] == [2.0, 2.0] and back["extra_field"] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="spread"):
        C.write_result(
            "bad", {"ours": 1, "peer": 1, "unit": "", "ratio": 1, "repeats": 1}, tmp_path
        )


def test_summary_line_names_the_target():
    r = C.build_result([0.9], [1.0], "samples/s", target=1.0)
    line = C.summary_line("train", r)
    assert "ratio 0.900" in line and "MISSED" in line


def test_thread_env_pins_every_thread_pool():
    env = C.thread_env(3, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["PATH"] == "/bin"


def test_run_json_reads_the_result_line_and_reports_failures(tmp_path):
    ok = [sys.executable, "-c", "print('noise'); print('RESULT {\"x\": 1}')"]
    assert C.run_json(ok, log_file=tmp_path / "ok.log") == {"x": 1}
    assert "noise" in (tmp_path / "ok.log").read_text()
    bad = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="boom"):
        C.run_json(bad)


def test_log_parsers_of_both_training_sides():
    train = _load("bench_train")
    history = [
        {"step": 5, "samples_per_s": 64.0},
        {"step": 10, "samples_per_s": 128.0},
        {"step": 12, "samples_per_s": 128.0},
    ]
    assert train.history_windows(history, 128) == [(0, 5, 10.0), (5, 5, 5.0), (10, 2, 2.0)]
    log = "\n".join(
        f"x | INFO | Train Epoch: 0 [{n:>4}/3840 (1%)] Data (t): 0.010 Batch (t): {t}, 1/s"
        for n, t in [(128, "9.000"), (768, "0.500"), (1408, "0.250")]
    )
    assert train.peer_windows(log, 128) == [(0, 1, 9.0), (1, 5, 2.5), (6, 5, 1.25)]
