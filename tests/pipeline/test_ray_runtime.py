"""Ray's environment is set in one place, before ``ray`` is imported (``harness.pipeline.ray_runtime``).

Each case runs in a fresh interpreter with a user's environment, because what is tested is
the order of imports and environment variables in a new process.
"""
from __future__ import annotations

import os
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


def test_inside_a_job_the_jobs_own_runtime_env_is_not_repeated(monkeypatch):
    """``ray job submit --runtime-env-json '{"env_vars": ...}'``: Ray refuses a driver's
    runtime env that repeats the job's variables; the same values are dropped (the job gives
    them to every worker), other values and fields win with Ray's override switch."""
    import json

    from harness.pipeline.ray_runtime import _beside_the_jobs
    monkeypatch.setenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", "0")     # restored after the test
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV")
    assert _beside_the_jobs({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}  # not a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {
        "working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"A": "1", "B": "2"}}}))
    assert _beside_the_jobs({"env_vars": {"A": "1", "C": "3"}}) == {"env_vars": {"C": "3"}}
    assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ
    assert _beside_the_jobs({"env_vars": {"A": "1"}, "pip": ["x"]}) == {"pip": ["x"]}
    assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ       # no field of the job's
    assert _beside_the_jobs({"env_vars": {"B": "9"}}) == {"env_vars": {"B": "9"}}
    assert os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"       # ours wins
