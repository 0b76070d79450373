"""Starting or joining Ray, the same way for every command that uses it (``run``, ``tune``).

Where Ray runs:
- ``ray.address`` in the spec, or ``RAY_ADDRESS`` in the environment (always set inside a
  ``ray job submit`` job): the harness attaches to that cluster;
- otherwise it starts a private local Ray (``ray.init(address="local")``) that binds and
  advertises 127.0.0.1 only.

Ray reads part of its configuration from the environment *when it is imported*
(``ray._private.ray_constants``), so ``prepare_environment`` must run before the first
``import ray`` of the process: the command line calls it right after the spec is read, and
nothing the spec loader imports pulls in Ray. It sets, unless the user already did:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (local Ray only): Ray then uses the loopback address
  for the node and its servers (GCS, raylet, workers, dashboard agent) listen on 127.0.0.1
  instead of every interface. It also stops a ``ray start --address`` from joining, which is
  why it is not set when attaching to a cluster;
- quiet defaults: no usage statistics, no print patching or preemption watcher in Ray Train,
  no MLflow URL banners.

Token authentication is left to Ray: a local Ray started by ``ray.init`` has it on by
default (the token is written to ``~/.ray/auth_token``), and inside a job the driver inherits
the cluster's setting. The harness never sets ``RAY_AUTH_MODE`` itself: setting it after Ray
was imported gives a GCS that expects a token and a client that does not send one.
"""
from __future__ import annotations

import os
import sys

QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
         "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
         # Ray Train's controller polls its workers every 2 s by default: each report, the
         # end of a fit and a lost worker wait for that poll. A head fit is small (a 1x1 conv
         # on frozen features), so 0.5 s takes ~3.5 s off each fit of the quickstart (18.5 ->
         # 15.0 s, tiny_vgg, one epoch) for four cheap polls a second. A user's value wins.
         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to attach to (the spec's ``ray.address``, else ``RAY_ADDRESS``), or None."""
    return address or os.environ.get("RAY_ADDRESS") or None


def prepare_environment(address: str | None = None) -> None:
    """Set Ray's environment for this process; call it before ``ray`` is imported."""
    local = cluster_address(address) is None
    for key, value in {**QUIET, **(LOOPBACK_ONLY if local else {})}.items():
        os.environ.setdefault(key, value)
    if local and "ray" in sys.modules:
        from ray._private import ray_constants
        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before harness.ray_runtime.prepare_environment "
                               "ran, so a local Ray would listen on every interface; call "
                               "prepare_environment() before importing ray")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             env_vars: dict[str, str] | None = None,
             runtime_env: dict | None = None) -> None:
    """Attach to the cluster, or start the private local Ray (see the module docstring).

    ``env_vars`` reach every worker (Ray Train workers and shard tasks), in both cases, on
    top of the spec's ``ray.runtime_env`` (e.g. plugins: ``pip``, ``py_modules``).
    """
    prepare_environment(address)
    import ray
    if ray.is_initialized():
        return
    runtime_env = dict(runtime_env or {})
    if env_vars:                         # the harness's variables win over the spec's
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    runtime_env = _beside_the_jobs(runtime_env) or None
    target = cluster_address(address)
    if target:
        ray.init(address=target, log_to_driver=False, runtime_env=runtime_env)
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env)


def _beside_the_jobs(runtime_env: dict) -> dict:
    """Inside a Ray job, ``runtime_env`` without what the job's own runtime env (``ray job
    submit --runtime-env-json``) already gives every worker: Ray refuses a driver's
    runtime env that repeats a job's field or variable. Variables with the same value are
    dropped; where the spec or the harness asks for something else (another value, a
    ``pip`` list of its own), theirs win (``RAY_OVERRIDE_JOB_RUNTIME_ENV``)."""
    import json
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get(
        "runtime_env") or {}
    if not job:
        return runtime_env
    job_vars = job.get("env_vars") or {}
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items()
                if job_vars.get(k) != v}
    out = {k: v for k, v in runtime_env.items() if k != "env_vars"}
    if env_vars:
        out["env_vars"] = env_vars
    if set(env_vars) & set(job_vars) or (set(out) - {"env_vars"}) & set(job):
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return out
