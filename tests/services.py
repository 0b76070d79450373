"""What end-to-end tests need to run commands as a user does.

- ``user_env``: a plain shell's environment (fresh HOME, only the README's variables);
- ``workspace``: a fresh copy of the project (its tracked files) to run commands in, its
  default cache already holding the shared generated inputs (data set, embedded backbones);
- ``mlflow_server``: a real MLflow server on 127.0.0.1, stopped by its own PID;
- ``object_store``, ``upload``: an S3 server (moto) on 127.0.0.1 and a folder copied into it;
- ``ray_processes``, ``kill_ray_processes``: the Ray processes a test started, found by the
  ``RAY_TMPDIR`` in their environment (a test stops those, never every Ray: ``ray stop``).
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


#: The variables the README tells users to set, the only ones a test may add to a user's
#: shell (``test_user_commands.test_documented_variables_are_in_the_readme`` checks the README).
DOCUMENTED = ("HARNESS_CACHE_DIR", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE",
              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR",
              # an object store's credentials (docs/cluster.md), read by pyarrow's S3 client
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "AWS_EC2_METADATA_DISABLED")
#: Fault injection for the reliability tests (inert unless set; see their docstrings).
TEST_HOOKS = ("HARNESS_TEST_KILL_SHARD", "HARNESS_TEST_FAIL_SHARD", "HARNESS_TEST_KILL_TRAIN",
              "HARNESS_TEST_KILL_NODE", "HARNESS_TEST_FAULT_MARKERS")
SHELL = ("PATH", "LANG", "LC_ALL", "TZ", "TERM", "USER", "LOGNAME", "SHELL")


def user_env(home: str | Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's plain shell: PATH, locale, a fresh HOME (no Ray token, no
    configuration) and only the README's documented variables given in ``extra``."""
    unknown = sorted(set(extra) - set(DOCUMENTED) - set(TEST_HOOKS))
    assert not unknown, f"not a documented variable: {unknown}"
    env = {k: os.environ[k] for k in SHELL if k in os.environ}
    env["HOME"] = str(home or tempfile.mkdtemp(prefix="home-", dir="/tmp"))
    env.update(extra)
    return env


def ensure_shared_inputs() -> None:
    """The session's test cache holds the quickstart data and tiny_vgg (built if missing)."""
    if (TEST_CACHE / "quickstart-v1").is_dir() and list((TEST_CACHE / "backbones").glob("tiny_vgg-*.pt")):
        return
    code = ("from harness.data.quickstart import ensure_quickstart; ensure_quickstart(); "
            "from harness.data.models import load_backbone; load_backbone('tiny_vgg')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO,
                   env=user_env(HARNESS_CACHE_DIR=str(TEST_CACHE)), check=True, timeout=900)


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


def project_copy(where: Path) -> Path:
    """A fresh copy of the project in ``where / "project"``: its tracked and unignored files,
    as a clone has."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    root = where / "project"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    return root


def workspace(where: Path) -> Path:
    """``project_copy`` whose default cache ``.harness-cache`` links the shared inputs (built
    once per session)."""
    ensure_shared_inputs()
    root = project_copy(where)
    cache = root / ".harness-cache"
    cache.mkdir()
    for name in ("quickstart-v1", "backbones"):
        (cache / name).symlink_to(TEST_CACHE / name, target_is_directory=True)
    return root


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
        stdout=log, stderr=subprocess.STDOUT, env=user_env(), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{uri}/health", proc, workdir / "mlflow-server.log",
                             "MLflow server", 60)
        yield uri
    finally:
        _stop(proc)
        log.close()


# -- Ray processes a test started (never `ray stop`: it stops every Ray on the machine) -------
def ray_processes(ray_tmp: str) -> list[int]:
    """PIDs of live processes whose environment names our (unique) RAY_TMPDIR."""
    return processes_with("RAY_TMPDIR", ray_tmp)


def processes_with(name: str, value: str) -> list[int]:
    """PIDs of live processes whose environment sets ``name`` to ``value`` (a test's unique
    RAY_TMPDIR or HOME: what it started, and all their children, inherit it)."""
    needle = f"{name}={value}\0".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
            stat = Path(f"/proc/{pid}/stat").read_text()
            if needle in env and stat.rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(pid))
    return found


def kill_ray_processes(ray_tmp: str) -> None:
    kill_processes_with("RAY_TMPDIR", ray_tmp)


def kill_processes_with(name: str, value: str) -> None:
    """SIGKILL every process ``processes_with(name, value)`` finds (never another's)."""
    for pid in processes_with(name, value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tensor_hashes(state: dict) -> dict[str, str]:
    """Each tensor of a state dict by its ``backbones.embedded.state_hash`` (name, dtype, shape
    and bytes): the golden files pin trained heads by these, so that a failure names the
    tensor (a ``torch.save`` file's own bytes vary between saves)."""
    from backbones.embedded import state_hash
    return {key: state_hash({key: t}) for key, t in sorted(state.items())}


# -- an S3 object store (moto) ----------------------------------------------------------------
S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
      "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def bucket_uri(endpoint: str, prefix: str) -> str:
    return f"s3://lcam/{prefix}?endpoint_override={endpoint}&scheme=http"


@contextlib.contextmanager
def object_store(workdir: Path):
    """An S3 server (moto) on 127.0.0.1 with the bucket ``lcam``: yields host:port."""
    import pyarrow.fs as pafs
    port = free_port()
    log = open(workdir / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=user_env(), start_new_session=True)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/", proc, workdir / "moto.log",
                             "moto", 60)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          access_key=S3["AWS_ACCESS_KEY_ID"], secret_key=S3["AWS_SECRET_ACCESS_KEY"],
                          allow_bucket_creation=True).create_dir("lcam")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()




def upload(endpoint: str, folder: Path, prefix: str) -> str:
    """Copy ``folder`` into the bucket under ``prefix``: the data set's URI there."""
    import pyarrow.fs as pafs
    s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http",
                           access_key=S3["AWS_ACCESS_KEY_ID"],
                           secret_key=S3["AWS_SECRET_ACCESS_KEY"])
    pafs.copy_files(str(folder), f"lcam/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    return bucket_uri(endpoint, prefix)


def quickstart_folder(dest: Path, train_per_class: int = 20, val_per_class: int = 2) -> Path:
    """A small image-classification folder (``data.kind: folder``) of the quickstart's files:
    ``classes.txt`` and the first images of each class of each split, with their masks and
    the val split's boxes; the same bytes on every call."""
    import json
    ensure_shared_inputs()
    source = TEST_CACHE / "quickstart-v1"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "classes.txt", dest / "classes.txt")
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        boxes = json.loads((source / split / "annotations.json").read_text())
        kept = {}
        for cls in sorted(p.name for p in (source / split).iterdir() if p.is_dir()):
            images = sorted(p for p in (source / split / cls).glob("*.png")
                            if ".mask." not in p.name)[:n]
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for image in images:
                shutil.copy2(image, dest / split / cls / image.name)
                mask = image.with_name(image.stem + ".mask.png")
                shutil.copy2(mask, dest / split / cls / mask.name)
                kept[f"{cls}/{image.name}"] = boxes[f"{cls}/{image.name}"]
        (dest / split / "annotations.json").write_text(json.dumps(kept, sort_keys=True))
    return dest
