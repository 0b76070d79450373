"""Ray's environment is set in one place, before ``ray`` is imported (``harness.pipeline.ray_runtime``).

Each case runs in a fresh interpreter with a user's environment, because what is tested is
the order of imports and environment variables in a new process.
"""
from __future__ import annotations

import subprocess
import sys

from services import REPO, user_env


def python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=user_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_reading_a_spec_does_not_import_ray():
    proc = python("import sys; from harness.spec import load_spec; "
                  "load_spec('jobs/quickstart.yaml'); print('ray' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_local_ray_is_kept_on_loopback_and_auth_is_left_to_ray():
    proc = python("import os; from harness.pipeline.ray_runtime import prepare_environment; "
                  "prepare_environment(None); "
                  "print(os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'], "
                  "os.environ.get('RAY_AUTH_MODE'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "None"]


def test_attaching_to_a_cluster_does_not_restrict_to_loopback():
    proc = python("import os; from harness.pipeline.ray_runtime import prepare_environment; "
                  "prepare_environment('ray://head:10001'); "
                  "print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))")
    assert proc.stdout.strip() == "None", proc.stderr


def test_ray_imported_first_is_caught_before_a_local_ray_starts():
    proc = python("import ray; from harness.pipeline.ray_runtime import prepare_environment; "
                  "prepare_environment(None)")
    assert proc.returncode != 0 and "imported before" in proc.stderr
