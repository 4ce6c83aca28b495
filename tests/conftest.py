"""Shared fixtures. Tests build their own tiny data; nothing downloads at run time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Subprocesses (dvc repro, torchrun, clipshift) must find the venv's executables.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Runs that a stage puts side by side (clipshift.parallel) stay in the test's process: a spawned
# worker costs seconds of imports and cannot see monkeypatches. tests/test_parallel.py and the
# end-to-end `dvc repro` test lift this to exercise the workers.
os.environ["CLIPSHIFT_WORKERS"] = "1"


@pytest.fixture(scope="module")
def one_omp_thread():
    """OMP_NUM_THREADS=1 for a whole module (its module-scoped reference runs too): bitwise
    comparisons of trainings need the same thread count in the runs compared, and one thread
    is steadier on the 2 cores shared with other jobs. Use with pytest.mark.usefixtures."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every test that runs a flow (starting one costs ~7 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private MLflow store (SQLite + local artifacts) in a temp working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("CLIPSHIFT_PIPELINE_RUN_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """The tiny study's baseline repo (`dvc repro` run and committed), built once per session
    (minutes); modules take their own checkout of it with tests.study.study_checkout."""
    from tests.study import tiny_study_repo

    return tiny_study_repo(tmp_path_factory.mktemp("tiny-study"))
