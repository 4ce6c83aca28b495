"""What every benchmark shares: A/B alternation, medians and spread, steady-state rates, the
machine facts, and the result JSON (``bench/results/<name>.json``).

Standard library only: the peer side of a benchmark runs this module inside the peer venv
(``bench/.peer-venv``), which has neither clipshift nor the project's dependencies.

Result schema (every script): ``{"ours", "peer", "unit", "ratio", "repeats", "spread": [min,
max], ...}`` where ``ours``/``peer`` are medians over the repeats, ``ratio`` is
``median(ours) / median(peer)``, and ``spread`` is the [min, max] of the per-repeat ratios
(repeat i's ours / repeat i's peer, measured back to back), i.e. how much the ratio itself
moved between repeats on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / "work"
PEER_VENV = Path(os.environ.get("PEER_VENV", BENCH_DIR / ".peer-venv"))
PEER_PYTHON = PEER_VENV / "bin" / "python"
OURS_PYTHON = REPO / ".venv" / "bin" / "python"
DEFAULT_DATA = REPO / "data" / "fetch"
MODEL_CONFIGS = REPO / "src" / "clipshift" / "model_configs"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# statistics


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> list[float]:
    """[min, max] of the values."""
    if not values:
        raise ValueError("spread of no values")
    return [float(min(values)), float(max(values))]


def paired_ratios(ours: Sequence[float], peer: Sequence[float]) -> list[float]:
    """ours[i] / peer[i]: each repeat's two sides ran back to back, under the same load."""
    if len(ours) != len(peer):
        raise ValueError(f"{len(ours)} ours vs {len(peer)} peer values: pair them 1:1")
    if any(p == 0 for p in peer):
        raise ValueError("a peer value is 0: cannot form a ratio")
    return [float(o) / float(p) for o, p in zip(ours, peer, strict=True)]


def steady_rate(
    windows: Sequence[tuple[int, int, float]], batch_size: int, skip_steps: int
) -> float:
    """Samples/s over the logged windows that start at or after ``skip_steps``.

    A window is ``(start_step, steps, seconds)``: ``steps`` optimizer steps done after
    ``start_step`` steps, taking ``seconds``. The first steps (allocator warm-up, worker start,
    shuffle-buffer fill) are excluded by starting the count at ``skip_steps``; the rate is total
    samples / total time over the rest (not a mean of rates, which would over-weight short
    windows).
    """
    kept = [(s, n, t) for s, n, t in windows if s >= skip_steps and n > 0]
    if not kept:
        raise ValueError(
            f"no logged window starts at or after step {skip_steps}: train for more steps or "
            "lower --skip-steps"
        )
    seconds = sum(t for _, _, t in kept)
    if seconds <= 0:
        raise ValueError("logged windows have no duration")
    return sum(n for _, n, _ in kept) * batch_size / seconds


def window_rates(
    windows: Sequence[tuple[int, int, float]], batch_size: int, skip_steps: int
) -> list[float]:
    """Samples/s of each window from ``skip_steps`` on. On a shared machine the fastest
    windows are the ones least disturbed by other jobs: their rate is a less load-sensitive
    estimate of what the code can do than the total."""
    return [n * batch_size / t for s, n, t in windows if s >= skip_steps and n > 0 and t > 0]


def alternate(
    sides: Mapping[str, Callable[[int], T]],
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[T]]:
    """Run every side ``repeats`` times, interleaved, rotating the order each repeat.

    With two sides this is A B, B A, A B, …: a slow drift of the machine's load (other jobs
    starting or ending) then hits both sides alike, and neither always runs first (cold file
    cache, CPU frequency). Each callable gets the repeat index. Returns ``{side: [values]}``.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(sides)
    out: dict[str, list[T]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            value = sides[name](i)
            out[name].append(value)
            if log is not None:
                took = time.perf_counter() - start
                log(f"  repeat {i + 1}/{repeats} {name}: {_short(value)} ({took:.1f} s)")
    return out


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)[:120]


# --------------------------------------------------------------------------------------------
# results


def machine_info(threads: int | None = None) -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return {
        "cpus": cpus,
        "threads": threads,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def build_result(
    ours: Sequence[float],
    peer: Sequence[float],
    unit: str,
    *,
    higher_is_better: bool = True,
    target: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The result dict: medians, their ratio, the per-repeat ratio spread, and ``extra``.

    ``target`` is a bound on the ratio: a minimum when higher is better (throughput ≥ 1.0×
    the peer), a maximum otherwise (sweep ≤ 1.3× an evaluation pass).
    """
    ratio = median(ours) / median(peer)
    ratios = paired_ratios(ours, peer)
    met = None
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    result: dict[str, Any] = {
        "ours": median(ours),
        "peer": median(peer),
        "unit": unit,
        "ratio": ratio,
        "repeats": len(ours),
        "spread": spread(ratios),
        "better": "higher" if higher_is_better else "lower",
        "target": target,
        "target_met": met,
        "ours_runs": [float(v) for v in ours],
        "peer_runs": [float(v) for v in peer],
        "ratio_runs": ratios,
        "ours_spread": spread(ours),
        "peer_spread": spread(peer),
    }
    result.update(extra)
    return result


def write_result(name: str, result: Mapping[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (a reader never sees half a file)."""
    for key in ("ours", "peer", "unit", "ratio", "repeats", "spread"):
        if key not in result:
            raise ValueError(f"result '{name}' lacks the required key '{key}'")
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = results_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def summary_line(name: str, result: Mapping[str, Any]) -> str:
    lo, hi = result["spread"]
    return (
        f"{name}: ours {result['ours']:.4g} vs peer {result['peer']:.4g} {result['unit']} → "
        f"ratio {result['ratio']:.3f} (repeats {result['repeats']}, spread {lo:.3f}–{hi:.3f}"
        + (
            f", target {result.get('target')}: {'met' if result.get('target_met') else 'MISSED'}"
            if result.get("target") is not None
            else ""
        )
        + ")"
    )


# --------------------------------------------------------------------------------------------
# processes


def default_threads() -> int:
    return machine_info()["cpus"]


def thread_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment both sides run under: the same intra-op thread count everywhere."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_json(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    log_file: Path | None = None,
) -> dict[str, Any]:
    """Run a side as a subprocess; its last stdout line starting with ``RESULT `` is JSON."""
    proc = subprocess.run(
        list(map(str, cmd)),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(
            f"benchmark side failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def emit(result: Mapping[str, Any]) -> None:
    """How a side reports to its parent: one ``RESULT {json}`` line on stdout."""
    sys.stdout.write("RESULT " + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def timed_cmd(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    log_file: Path | None = None,
) -> float:
    """Wall seconds of a command (fails loudly, with its output tail, if it fails)."""
    start = time.perf_counter()
    proc = subprocess.run(
        list(map(str, cmd)),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as fh:
            fh.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return seconds


def base_parser(description: str, work_dir: Path, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark has; parse with :func:`parse_args` (``--smoke``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="A/B repeats (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="intra-op threads on both sides (default: the CPUs available, %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="fetch's output (default: data/fetch; with --smoke: <work dir>/data, where a tiny "
        "world is built unless it holds one)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=work_dir,
        help="working files (default: %(default)s; with --smoke: a new temporary directory)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="where <name>.json goes (default: bench/results; with --smoke: <work dir>/results)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check that the script still runs, in seconds: one repeat, a toy model, a tiny "
        "world; nothing is downloaded and bench/results/ is never written",
    )
    return parser


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    smoke: Mapping[str, Any] | None = None,
) -> argparse.Namespace:
    """Parse the command line; with ``--smoke``, the script's ``smoke`` values replace its
    defaults (an option given on the command line still wins) and the repeats drop to one.

    A smoke run's numbers mean nothing (toy model, tiny data, one repeat): its directories
    default to a fresh temporary one, and it refuses to write into bench/results/, where it
    would overwrite a real measurement.
    """
    args = parser.parse_args(argv)
    if not args.smoke:
        args.results_dir = args.results_dir or RESULTS_DIR
        return args
    parser.set_defaults(repeats=1, work_dir=None, data_dir=None, **(smoke or {}))
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="clipshift-bench-smoke-"))
    args.data_dir = args.data_dir or args.work_dir / "data"
    args.results_dir = args.results_dir or args.work_dir / "results"
    if args.results_dir.resolve() == RESULTS_DIR.resolve():
        parser.error("--smoke never writes into bench/results/: give another --results-dir")
    return args


def peer_python(smoke: bool) -> Path:
    """The python the peer side runs under: the peer venv's; in a smoke run without one, the
    project venv's (each script then runs what of its peer that venv has, or a stand-in, and
    records which in ``peer_tool``)."""
    if PEER_PYTHON.exists():
        return PEER_PYTHON
    if smoke:
        return OURS_PYTHON
    raise SystemExit("no peer venv: run `bash bench/peer_env.sh` first")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
