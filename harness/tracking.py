"""MLflow bookkeeping: one parent run per spec, one child run per backbone x method.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db`` with
artifacts in ``./mlruns`` (MLflow's own default). Runs are found again by tags rather than
created anew, so a rerun of the same spec resumes its interrupted runs instead of leaving
them RUNNING beside a duplicate. Only ``MlflowClient`` is used (no global active run).
"""
from __future__ import annotations

import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PACKAGES = ("torch", "torchvision", "ray", "mlflow", "pyarrow", "lcam-bench")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except Exception:
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not-installed"
    return out


class Tracker:
    """A thin, resumable wrapper over ``MlflowClient`` for one benchmark run."""

    def __init__(self, experiment: str, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def _find(self, filters: list[str]) -> Any:
        runs = self.client.search_runs([self.experiment_id], " and ".join(filters),
                                       order_by=["attributes.start_time DESC"], max_results=5)
        return runs[0] if runs else None

    def parent_run(self, name: str, fingerprint: str, tags: dict[str, str]) -> str:
        """Resume an unfinished parent run of this spec, or start a new one."""
        run = self._find([f"tags.spec_fingerprint = '{fingerprint}'",
                          "tags.harness_role = 'benchmark'"])
        if run is not None and run.info.status != "FINISHED":
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **tags, "spec_fingerprint": fingerprint, "harness_role": "benchmark"})
        return run.info.run_id

    def child_run(self, parent_id: str, key: str, name: str, tags: dict[str, str]) -> str:
        """The child run for ``key`` under ``parent_id`` (created once, then reused)."""
        run = self._find([f"tags.`mlflow.parentRunId` = '{parent_id}'", f"tags.run_key = '{key}'"])
        if run is not None:
            if run.info.status != "FINISHED":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **tags, "mlflow.parentRunId": parent_id, "run_key": key, "harness_role": "method"})
        return run.info.run_id

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None) -> None:
        now = int(time.time() * 1000)
        existing = self.client.get_run(run_id).data.params
        params = {k: str(v)[:6000] for k, v in (params or {}).items() if k not in existing}
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def artifact(self, run_id: str, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), subdir)

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
