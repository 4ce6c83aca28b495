"""Every benchmark script still runs: each ``bench/bench_*.py`` in smoke mode (``--smoke``).

The scripts are found by glob, so a new benchmark is run here without anyone listing it. Each
runs as a subprocess (as ``bash bench/run.sh`` runs it) on one tiny world built first and
shared by all, with a toy model and one repeat, and must exit 0 and write its result JSON with
finite numbers. A benchmark rots silently otherwise: bench_eval kept loading the pipeline's
checkpoint into an architecture the project no longer trains.

The runs take two at a time (the cores of the development machine): a smoke run's numbers mean
nothing, so overlapping does no harm, and most of each run is importing torch, which is
single-threaded.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))
REQUIRED = ("ours", "peer", "unit", "ratio", "repeats", "spread", "ratio_runs")
# correctness checks a benchmark makes on the side: true even for a toy model
AGREEMENT_FLAGS = ("accuracy_agree", "alpha0_matches_eval")
PARALLEL = 2


def bench_name(script: Path) -> str:
    """``bench_train.py`` → ``train``: its result file and its name in run.sh."""
    return script.stem.removeprefix("bench_")


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.glob("*")}


def ratio_values(result: dict[str, Any]) -> list[tuple[str, float]]:
    """Every number a reader compares: ours/peer, the ratios and their per-repeat lists."""
    found = [("ours", result["ours"]), ("peer", result["peer"])]
    for key, value in result.items():
        if "ratio" not in key and key != "spread":
            continue
        values = value if isinstance(value, list) else [value]
        found += [(key, v) for v in values if isinstance(v, int | float)]
    return found


def build_world(data: Path) -> None:
    """The smoke world, once, as every script would build it (bench/smoke.py)."""
    code = "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import smoke; "
    code += "smoke.ensure_world(Path(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(BENCH), str(data)], check=True, timeout=300)


def smoke_run(script: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script), "--smoke", "--data-dir", str(data)]
    cmd += ["--work-dir", str(out / "work"), "--results-dir", str(out / "results")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@dataclass
class SmokeRuns:
    runs: dict[Path, tuple[subprocess.CompletedProcess, Path]]  # script: (process, results dir)
    results_before: dict[str, tuple[int, int]]  # bench/results/ before the runs


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> SmokeRuns:
    """Every script's smoke run (all of them, whichever tests were selected)."""
    root, before = tmp_path_factory.mktemp("bench-smoke"), files_of(BENCH / "results")
    build_world(root / "data")
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        procs = pool.map(lambda s: smoke_run(s, root / "data", root / s.stem), SCRIPTS)
        runs = {s: (p, root / s.stem / "results") for s, p in zip(SCRIPTS, procs, strict=True)}
    return SmokeRuns(runs, before)


def test_the_glob_finds_the_benchmarks():
    names = {bench_name(s) for s in SCRIPTS}
    assert {"train", "eval", "wiseft", "loader", "orchestration"} <= names


def test_run_sh_and_the_readme_know_every_benchmark():
    default = re.search(r"names=\(([a-z ]+)\)", (BENCH / "run.sh").read_text())
    readme = (BENCH / "README.md").read_text()
    for script in SCRIPTS:
        assert bench_name(script) in default.group(1).split(), f"run.sh omits {script.name}"
        assert f"`{script.name}`" in readme, f"bench/README.md omits {script.name}"


@pytest.mark.parametrize("script", SCRIPTS, ids=bench_name)
def test_smoke_mode_refuses_bench_results(script: Path, tmp_path: Path):
    # parsed before any heavy import: a fraction of a second each
    cmd = [sys.executable, str(script), "--smoke", "--work-dir", str(tmp_path)]
    cmd += ["--results-dir", str(BENCH / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "never writes into bench/results" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=bench_name)
def test_benchmark_runs_in_smoke_mode(script: Path, smoke_runs: SmokeRuns):
    proc, results = smoke_runs.runs[script]
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, tail

    result = json.loads((results / f"{bench_name(script)}.json").read_text())
    assert set(REQUIRED) <= set(result), tail
    assert result["smoke"] is True and result["repeats"] == 1
    for key, value in ratio_values(result):
        assert math.isfinite(value), f"{key} = {value}"
    assert result["ratio"] > 0
    for flag in AGREEMENT_FLAGS:
        assert result.get(flag, True) is True, f"{flag} is false"


def test_smoke_runs_leave_bench_results_alone(smoke_runs: SmokeRuns):
    assert files_of(BENCH / "results") == smoke_runs.results_before
