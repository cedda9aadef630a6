"""Real server processes for tests, on 127.0.0.1 only, started and stopped by the tests.

Each waits for its health URL for a bounded time and is killed on exit, whatever happens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def server(
    cmd: list[str], health: str, log: Path, timeout: float = 120, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # so the whole process group can be stopped
        )
    try:
        wait_http(health, proc, timeout, log)
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` with a SQLite backend and proxied file artifacts; yields its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        (folder / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with server(cmd, f"{uri}/health", folder / "server.log", env=env):
        yield uri


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """``mlflow models serve`` of a registered model in this environment; yields its base URL."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    # The scoring server execs ``uvicorn`` by name: the venv's bin must be on PATH (as when the
    # venv is activated, or in the project image).
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with server(cmd, f"{url}/ping", log, timeout=180, env=env):
        yield url
