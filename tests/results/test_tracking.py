"""MLflow bookkeeping that the UI depends on: the experiment's kind and the saved runs view."""
from __future__ import annotations

import json

from harness.results.tracking import VIEW_KEY, Tracker, ui_path


def test_new_and_old_experiments_are_model_training_with_a_table1_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("fresh", uri)
    old = tracker.client.create_experiment("made-before-the-tag")
    assert tracker.client.get_experiment(old).tags.get("mlflow.experimentKind") is None
    Tracker("made-before-the-tag", uri)
    for exp_id in (tracker.experiment_id, old):
        tags = tracker.client.get_experiment(exp_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
    tracker.publish_view(["AD_100", "IC_100", "FW"])
    envelope = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[
        f"mlflow.sharedViewState.{VIEW_KEY}"])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "Table 1" and isinstance(envelope["createdAt"], int)
    assert state["selectedColumns"][:3] == ["metrics.`AD_100`", "metrics.`IC_100`", "metrics.`FW`"]
    assert state["searchFilter"] == "tags.harness_role = 'method'"
    assert state["orderByKey"] == "tags.`mlflow.runName`" and state["orderByAsc"] is True


def test_ui_link_opens_the_runs_table_of_the_view(tmp_path):
    local = Tracker("x", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert local.ui_link().startswith("mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///")
    path = ui_path(local.experiment_id)
    assert path.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")
    assert local.ui_link().endswith("http://127.0.0.1:5000" + path)
