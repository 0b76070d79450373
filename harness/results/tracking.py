"""MLflow bookkeeping: one parent run per spec, one child run per backbone x method.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db`` with
artifacts in ``./mlruns`` (MLflow's own default). Runs are found again by tags rather than
created anew, so a rerun of the same spec resumes its interrupted runs instead of leaving
them RUNNING beside a duplicate. Only ``MlflowClient`` is used (no global active run).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any


PACKAGES = ("torch", "torchvision", "ray", "mlflow", "pyarrow", "lcam-bench")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (MLflow's default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / 'mlflow.db'}"


#: What the experiment holds, for MLflow 3's UI and API (model training, not GenAI traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: The runs view ``publish_view`` saves in the experiment (an MLflow "shared view").
VIEW_KEY = "table1"


def ui_path(experiment_id: str) -> str:
    """The part after the UI's address that opens the saved view of an experiment's runs.

    MLflow 3.17's UI starts in its GenAI mode (traces overview) whatever the experiment's
    kind; ``workflowType=machine_learning`` selects the runs table, ``viewStateShareKey`` the
    view saved by ``publish_view``."""
    return (f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


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
        from mlflow.tracking import MlflowClient     # here: ``validate`` needs no MLflow
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (exp.experiment_id if exp else
                              self.client.create_experiment(experiment, tags=EXPERIMENT_KIND))
        if exp is not None and exp.tags.get("mlflow.experimentKind") is None:
            for key, value in EXPERIMENT_KIND.items():      # experiments made before the tag
                self.client.set_experiment_tag(self.experiment_id, key, value)

    def publish_view(self, metric_columns: list[str]) -> None:
        """Save the experiment's "Table 1" view: one row per method run (the parents filtered
        out), sorted by run name (backbone, then the spec's row order), the metrics as
        columns in Table 1's order. Stored as MLflow's shared-view experiment tag."""
        cols = [f"metrics.`{c}`" for c in metric_columns] + ["tags.`variant`"]
        state = {"selectedColumns": cols, "columnOrder": cols,
                 "searchFilter": "tags.harness_role = 'method'",
                 "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True}
        now = int(time.time() * 1000)
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}",
                                       json.dumps({"name": "Table 1", "createdAt": now,
                                                   "updatedAt": now, "state": json.dumps(state)}))

    def ui_link(self) -> str:
        """Where to look at the runs: the server's page, or the ``mlflow ui`` command first."""
        if self.uri.startswith(("http://", "https://")):
            return self.uri.rstrip("/") + ui_path(self.experiment_id)
        return (f"mlflow ui --host 127.0.0.1 --backend-store-uri {self.uri}, then "
                f"http://127.0.0.1:5000{ui_path(self.experiment_id)}")

    def _find(self, filters: list[str]) -> Any:
        runs = self.client.search_runs([self.experiment_id], " and ".join(filters),
                                       order_by=["attributes.start_time DESC"], max_results=5)
        return runs[0] if runs else None

    def parent_run(self, name: str, fingerprint: str, tags: dict[str, str],
                   role: str = "benchmark") -> str:
        """Resume an unfinished parent run of this spec, or start a new one.

        ``role``: ``benchmark`` (a ``run``: what ``harness report`` reads) or ``sweep``."""
        run = self._find([f"tags.spec_fingerprint = '{fingerprint}'",
                          f"tags.harness_role = '{role}'"])
        if run is not None and run.info.status != "FINISHED":
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **tags, "spec_fingerprint": fingerprint, "harness_role": role})
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
        from mlflow.entities import Metric, Param, RunTag
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
