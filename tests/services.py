"""Real services for end-to-end tests: an MLflow server and a Ray head on 127.0.0.1.

Each is started as a child process and stopped by its own PID (never ``ray stop``, which
would kill every Ray process on the machine).
"""
from __future__ import annotations

import contextlib
import shutil
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = REPO / ".harness-cache" / "tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_AUTH_MODE": "token", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1",
                "HARNESS_CACHE_DIR": str(TEST_CACHE)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def ensure_shared_inputs() -> None:
    """The session's test cache holds the quickstart data and tiny_vgg (built if missing)."""
    if (TEST_CACHE / "quickstart-v1").is_dir() and list((TEST_CACHE / "backbones").glob("tiny_vgg-*.pt")):
        return
    code = ("from harness.quickstart import ensure_quickstart; ensure_quickstart(); "
            "import backbones; backbones.load('tiny_vgg', weights='embedded')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base_env(), check=True,
                   timeout=900)


def fresh_cache(where: Path, heads_from: Path | None = None) -> Path:
    """A new cache dir sharing the test cache's data and backbones (symlinks), nothing else:
    no shards, heads (unless copied from ``heads_from``), sweeps or Ray results."""
    ensure_shared_inputs()
    cache = where / "cache"
    cache.mkdir(parents=True)
    for name in ("quickstart-v1", "backbones"):
        (cache / name).symlink_to(TEST_CACHE / name, target_is_directory=True)
    if heads_from is not None:
        shutil.copytree(heads_from / "heads", cache / "heads")
    return cache


def short_tmp(prefix: str) -> str:
    """A short temp dir (Unix socket paths must stay under 107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, what: str,
                         timeout: float) -> None:
    """Poll ``url`` until any HTTP answer (an auth refusal counts), or fail with the log."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return                         # it answers (token auth refuses anonymous calls)
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(workdir: Path):
    """Yield the URI of an MLflow server on 127.0.0.1 with a sqlite store in ``workdir``."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", str(workdir / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{uri}/health", proc, workdir / "mlflow-server.log",
                             "MLflow server", 60)
        yield uri
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2):
    """Yield the dashboard address of a Ray head started with ``ray start --block``."""
    port, dash = free_port(), free_port()
    tmp = short_tmp("rayh")
    log = open(Path(tmp) / "head.log", "w")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={tmp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_until_answering(f"{address}/api/version", proc, Path(tmp) / "head.log",
                             "Ray head", 90)
        yield address
    finally:
        _stop(proc, timeout=30)
        log.close()
