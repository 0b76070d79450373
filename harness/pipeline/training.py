"""Stage 2 of a run: the L-CAM heads not in the storage yet, trained while the evaluation runs.

``HeadTraining`` starts one Ray Train fit per head group (``harness.pipeline.heads.fit_heads``:
resumable, its checkpoints in the storage), each in a background thread of the driver, so
that the driver meanwhile evaluates the cells that need no trained head (the runner's loop:
``harness.pipeline.runner``). The fits of different backbones run at the same time (Ray
places their workers as resources allow). ``poll`` writes each group's heads as soon as its
fit ends and returns the cells they unlock; ``demands`` is what the running fits hold, which
the evaluation's worker pool leaves free (``harness.pipeline.resources.slots``). A fit that
fails fails its cells only (``failed``); the other cells go on.

The threads are daemon threads: a Ctrl-C of the driver is not held up by a fit in progress
(Ray stops its workers when the driver exits; the fit resumes from its last epoch
checkpoint on the next run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from typing import Any

from harness.data.cache import stable_hash
from harness.data.storage import Storage
from harness.pipeline import resources
from harness.pipeline.heads import fit_heads, head_files, write_heads
from harness.pipeline.inputs import Inputs
from harness.pipeline.plan import HeadGroup, Plan


@dataclasses.dataclass(frozen=True)
class _Fit:
    """One head group to train: its missing heads' storage paths and the fit's name."""

    group: HeadGroup
    paths: dict[str, str]                  # head id -> storage path of its file
    name: str

    @property
    def label(self) -> str:
        return f"train heads {self.group.backbone} ({len(self.paths)})"

    def run_key(self, head_id: str) -> str:
        return f"{self.group.backbone}/{head_id}"

    @property
    def cell_keys(self) -> list[str]:
        return [self.run_key(h) for h in self.paths]

    def epochs_done(self, storage: Storage) -> str:
        return storage.path("ray_results", f"{self.name}.progress.json")

    def demand(self) -> resources.Demand:
        g = self.group
        return resources.Demand(f"the head training of {g.backbone}", "train", g.cpus,
                                1.0 if g.use_gpu else 0.0, g.workers)


def _fit_name(group: HeadGroup, files: list[str]) -> str:
    return f"heads-{group.backbone}-{stable_hash([f.rsplit('/', 1)[-1] for f in files], 10)}"


def fits_to_run(plan: Plan, files: dict[str, str], storage: Storage) -> list[_Fit]:
    """A fit per head group with heads missing from the storage (of those heads only)."""
    fits = []
    for group in plan.head_groups:
        missing = [h for h in group.heads
                   if not storage.exists(files[f"{group.backbone}/{h.method_id}"])]
        if missing:
            group = dataclasses.replace(group, heads=tuple(missing))
            paths = {h.method_id: files[f"{group.backbone}/{h.method_id}"] for h in missing}
            fits.append(_Fit(group, paths, _fit_name(group, list(paths.values()))))
    return fits


class _Running(threading.Thread):
    """One fit in a daemon thread: its result, or the error it raised."""

    def __init__(self, fit: _Fit, kwargs: dict[str, Any]):
        super().__init__(name=f"fit-{fit.group.backbone}", daemon=True)
        self.fit, self.kwargs = fit, kwargs
        self.state: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.state = fit_heads(self.fit.group, **self.kwargs)
        except BaseException as err:          # reported by poll, in the driver's thread
            self.error = err


class HeadTraining:
    """The head fits of a run (see the module docstring)."""

    def __init__(self, plan: Plan, inputs: Inputs, storage: Storage, tracking_uri: str,
                 run_ids: dict[str, str], progress):
        self.plan, self.inputs, self.storage = plan, inputs, storage
        self.tracking_uri, self.run_ids, self.progress = tracking_uri, run_ids, progress
        self.files = head_files(plan, inputs, storage)
        self.fits = fits_to_run(plan, self.files, storage)
        self.threads: list[_Running] = []
        self.failed: dict[str, str] = {}        # cell key -> error

    def waits_for(self, cell_key: str) -> bool:
        """Whether ``cell_key``'s head is one this training still has to make."""
        return any(cell_key in fit.cell_keys for fit in self.fits)

    def start(self) -> None:
        if not self.fits:
            return
        live = curves_reach_tracking(self.tracking_uri)
        for fit in self.fits:
            self.progress(fit.label, 0, fit.group.epochs)
            thread = _Running(fit, dict(
                name=fit.name, seed=self.plan.seed, storage=self.storage,
                tracking_uri=self.tracking_uri,
                run_ids={h: self.run_ids[fit.run_key(h)] for h in fit.paths},
                progress=fit.epochs_done(self.storage), live_curves=live,
                weights_id=self.inputs.weights_id(fit.group.backbone)))
            thread.start()
            self.threads.append(thread)

    @property
    def running(self) -> bool:
        return bool(self.threads)

    def demands(self) -> list[resources.Demand]:
        """What the fits still running hold on the cluster."""
        return [t.fit.demand() for t in self.threads]

    def poll(self) -> list[str]:
        """The cells whose heads were written since the last call (each finished fit's heads
        written before the next one's), and the epoch progress of the others."""
        ready = []
        for thread in [t for t in self.threads if not t.is_alive()]:
            self.threads.remove(thread)
            fit = thread.fit
            if thread.error is not None:
                if isinstance(thread.error, (KeyboardInterrupt, SystemExit)):
                    raise thread.error
                message = f"{type(thread.error).__name__}: {str(thread.error).strip()[:500]}"
                self.failed.update({key: f"head training failed: {message}"
                                    for key in fit.cell_keys})
                continue
            state = thread.state
            self.progress(fit.label, fit.group.epochs, fit.group.epochs)
            write_heads(state["heads"], self.inputs.backbones[fit.group.backbone], fit.group,
                        fit.paths, self.storage, {"fit": fit.name,
                                                  "train_nodes": state.get("nodes", [])})
            _tag_train_nodes(self.tracking_uri, [self.run_ids[k] for k in fit.cell_keys],
                             state.get("nodes", []))
            ready += fit.cell_keys
        for thread in self.threads:
            with contextlib.suppress(OSError, ValueError, KeyError):
                epoch = json.loads(self.storage.read_bytes(
                    thread.fit.epochs_done(self.storage)))["epoch"]
                self.progress(thread.fit.label, epoch, thread.fit.group.epochs)
        return ready

    def wait(self, interval: float = 0.5) -> list[str]:
        """Poll until every fit has ended: the cells whose heads were written."""
        ready = []
        while self.threads:
            for thread in self.threads:
                thread.join(interval)
            ready += self.poll()
        return ready


def train_heads(plan: Plan, inputs: Inputs, storage: Storage, tracking_uri: str,
                run_ids: dict[str, str], progress) -> dict[str, str]:
    """Train every head not in the storage and wait for the fits (``HeadTraining``, without
    an evaluation beside it); returns ``head_files``. Raises the first fit's failure."""
    training = HeadTraining(plan, inputs, storage, tracking_uri, run_ids, progress)
    training.start()
    training.wait()
    if training.failed:
        raise RuntimeError(next(iter(training.failed.values())))
    return training.files


def _tag_train_nodes(tracking_uri: str, run_ids: list[str], nodes: list[str]) -> None:
    """Tag ``train_nodes``: the Ray node ids of the fit's workers (rank order)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    for run_id in run_ids:
        client.set_tag(run_id, "train_nodes", ",".join(nodes))


def curves_reach_tracking(tracking_uri: str) -> bool:
    """Whether the training workers can log their curves as they train: the store is a
    server, or Ray has a single node (a file store is only on the driver's node)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return True
    import ray
    return sum(1 for n in ray.nodes() if n.get("Alive")) <= 1
