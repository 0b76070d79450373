"""``Storage.write_bytes`` on a local folder is atomic: a process killed in the middle of a
write leaves the previous file whole (or none), never a part of the new one. The write is
real (a 512 MiB payload in a subprocess), the kill a SIGKILL as soon as any byte of it is on
disk, so the test fails on a direct write into the target."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from services import REPO, user_env

PROGRAM = """
import sys
from harness.data.storage import Storage
store = Storage(sys.argv[1])
store.write_bytes(store.path("shards", "rows.parquet"), b"x" * (512 << 20))
"""


def _partial(folder) -> bool:
    """Whether some file of ``folder`` holds bytes of the new payload (not the old file)."""
    for entry in os.scandir(folder):
        try:
            size = entry.stat().st_size
        except FileNotFoundError:                  # renamed away meanwhile
            continue
        if size > len(b"old rows"):
            return True
    return False


def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path):
    from harness.data.storage import Storage
    store = Storage(tmp_path / "store")
    target = store.write_bytes(store.path("shards", "rows.parquet"), b"old rows")
    folder = os.path.dirname(target)
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(tmp_path / "store")], cwd=REPO,
                            env=user_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not _partial(folder):
            assert proc.poll() is None, "the writer ended before it was seen writing: " + \
                proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the payload never reached the disk"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    with open(target, "rb") as f:
        assert f.read() == b"old rows"             # the old file, whole
