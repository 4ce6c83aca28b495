"""Prefect's temporary API server, started the moment a stage command starts.

With no ``PREFECT_API_URL``, Prefect 3 starts a temporary server (uvicorn in a subprocess) the
first time a flow needs the API: the stage process first imports the whole server app (2-3 s)
only to launch it, then waits for it to answer (~4 s), before the stage does any work.
``start_early`` launches the same server (the command and flags of Prefect's
``SubprocessASGIServer``) before anything heavy is imported, so its start-up overlaps the
stage's own imports, and points ``PREFECT_API_URL`` at it; ``wait_until_ready`` is called just
before the flow runs. The socket is bound here and handed to uvicorn (``--fd``), so the port is
ours from the start (no port race between parallel stages) and early requests queue in the
kernel until the server accepts them. The server stops when the process exits, after
Prefect's own exit handlers have sent their last logs and events.

Nothing is started when Prefect is configured otherwise (``PREFECT_API_URL`` in the
environment or the active profile, a Prefect config file in the working directory, the
temporary server disabled, or Prefect already imported): Prefect then behaves as it always does.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from clipshift.errors import ClipshiftError

# The flags Prefect's SubprocessASGIServer sets (prefect/server/api/server.py, Prefect 3.8).
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STOP_WAIT_S = 5.0


class TemporaryServer:
    """A uvicorn process serving Prefect's API on a socket bound by this process."""

    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process = process
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ready = False

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Block until ``/health`` answers; a clear error if the server died or is too slow."""
        if self.ready:
            return
        timeout_s = timeout_s or float(os.environ.get(STARTUP_TIMEOUT_ENV, "120"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClipshiftError(
                    f"the temporary Prefect server exited with status {self.process.returncode} "
                    "before answering (its error is printed above); fix it, or run a Prefect "
                    "server and set PREFECT_API_URL"
                )
            try:
                # The request waits in the socket's backlog until the server accepts it.
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        self.ready = True
                        return
            except OSError:
                time.sleep(0.1)
        raise ClipshiftError(
            f"the temporary Prefect server at {self.api_url} did not answer in {timeout_s:.0f} s; "
            f"raise {STARTUP_TIMEOUT_ENV} on a busy machine, or run a Prefect server and set "
            "PREFECT_API_URL"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _prefect_dir() -> Path | None:
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    return Path(spec.origin).parent if spec and spec.origin else None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _active_profile(prefect_dir: Path) -> dict:
    """The settings of Prefect's active profile: its defaults overlaid by the user's file."""
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    user_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    defaults = _read_toml(prefect_dir / "settings" / "profiles.toml")
    user = _read_toml(user_path)
    active = os.environ.get("PREFECT_PROFILE") or user.get("active") or defaults.get("active")
    return {
        **defaults.get("profiles", {}).get(active, {}),
        **user.get("profiles", {}).get(active, {}),
    }


def _configured_elsewhere(prefect_dir: Path) -> bool:
    """True when Prefect's settings might not be the plain temporary-server default."""
    if "prefect" in sys.modules:  # settings already loaded; a new env var would not be seen
        return True
    profile = _active_profile(prefect_dir)
    settings = {**profile, **os.environ}
    if settings.get("PREFECT_API_URL"):
        return True
    if str(settings.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")).lower() in ("0", "false"):
        return True
    cwd = Path.cwd()
    if (cwd / "prefect.toml").exists() or "PREFECT_" in _text(cwd / ".env"):
        return True
    return "prefect" in _read_toml(cwd / "pyproject.toml").get("tool", {})


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # Inherited by the accepted connections: without it, Nagle's algorithm delays each reply
    # on a kept-alive connection by ~40 ms (uvicorn cannot set it on an --fd socket).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(128)
    return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies, even by SIGKILL, so a
    killed stage never leaves its server behind holding the Prefect database (Linux only)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_early() -> TemporaryServer | None:
    """Launch the temporary server now and point ``PREFECT_API_URL`` at it, or do nothing."""
    if os.name == "nt":  # no fd passing to a child there: leave it to Prefect
        return None
    prefect_dir = _prefect_dir()
    if prefect_dir is None or _configured_elsewhere(prefect_dir):
        return None
    sock = _listening_socket()
    port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent),
        "--factory", "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    try:
        process = subprocess.Popen(
            command,
            env={**os.environ, **SERVER_ENV},
            pass_fds=[sock.fileno()],
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    finally:
        sock.close()  # the server holds the only copy: if it dies, clients are refused
    server = TemporaryServer(process, port)
    # Registered before Prefect is imported: exit handlers run last-in first-out, so Prefect's
    # own (flushing logs and events to this server) run before it stops.
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    print(f"clipshift: temporary Prefect server on {server.api_url}", file=sys.stderr)
    return server
