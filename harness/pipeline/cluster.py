"""What every node of a multi-node Ray cluster must have, checked before anything starts.

A cluster need not share a filesystem (``harness.data.storage``): each node builds its own
generated inputs, and the shard tasks return their rows to the driver. Two things cannot be
rebuilt on a node, so one small task per alive node (pinned to it, no CPU asked) looks:

- the **data read in place**: every local ``data.root`` of the plan (ImageNet folders) must
  exist on every node that may run a shard or a training worker; a node that lacks one is
  named. A ``data.root`` in an object store (``s3://...``) must be readable from every node
  when heads train (their workers stream the images from it);
- the **results storage**, when Ray Train or Tune will run: their workers write checkpoints
  to ``storage.uri`` from whatever node they are on, and the driver reads them back. A local
  folder that another node does not see (no shared filesystem) would lose them, so the run
  is refused with the fix (an object store, ``s3://bucket/prefix``, or a shared folder).

On one node there is nothing to check.
"""
from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness.data.storage import Storage
from harness.errors import UserError


class ClusterRefused(UserError):
    """A node lacks what the run needs (exit 2; nothing was started)."""


@dataclass(frozen=True)
class NodeView:
    """What one node sees."""

    node_id: str
    host: str
    missing_roots: tuple[str, ...]
    storage_error: str | None          # None: the probe object was read back


def _readable(uri: str) -> bool:
    from harness.data.sources import RemoteFolder
    try:
        return RemoteFolder(uri).is_dir("train")
    except Exception:                                # credentials, endpoint, permissions
        return False


def _look(roots: tuple[str, ...], storage: Storage, probe: str | None) -> NodeView:
    import ray
    missing = tuple(r for r in roots if not (_readable(r) if "://" in r else Path(r).is_dir()))
    error = None
    if probe is not None:
        try:
            if not storage.exists(probe):
                error = f"{probe} is not there"
        except Exception as err:                     # credentials, endpoint, permissions
            error = f"{type(err).__name__}: {err}"
    return NodeView(ray.get_runtime_context().get_node_id(), socket.gethostname(), missing,
                    error)


def alive_nodes() -> list[str]:
    import ray
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def look_from_every_node(roots: tuple[str, ...], storage: Storage,
                         with_storage: bool) -> list[NodeView]:
    """One ``_look`` per alive node (a probe object in the storage first, if asked)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    probe = None
    if with_storage:
        probe = storage.path(".probe", uuid.uuid4().hex)
        storage.write_bytes(probe, b"visible")
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    try:
        return ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(roots, storage, probe) for node in alive_nodes()])
    finally:
        if probe is not None:
            storage.fs.delete_file(probe)


def asks_for_gpus(plan) -> bool:
    """Whether any shard, analysis or Train worker of the plan asks for a GPU."""
    return plan.evaluation.gpus_per_task > 0 or any(g.use_gpu for g in plan.head_groups)


def _cuda_of_node() -> dict:
    import ray

    from harness.pipeline import devices
    return {**devices.cuda_view(), "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id()}


def check_gpus(what: str = "sharding.gpus_per_task or train.use_gpu") -> list[dict]:
    """Refuse (``ClusterRefused``) GPUs that Ray offers but torch cannot use: on every alive
    node that declares GPUs, a small task (no CPU, no GPU asked: it sees the node's devices)
    looks whether torch sees CUDA there. A GPU share on such a node would fail in every
    worker (a CPU build of torch, no driver, a ``--num-gpus`` with no GPU behind it), so the
    run is refused before anything trains, naming the node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    look = ray.remote(num_cpus=0, max_retries=0)(_cuda_of_node)
    views = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes])
    problems = [f"node {v['node_id'][:12]} ({v['host']}) offers "
                f"{n['Resources']['GPU']:g} GPU to Ray, but torch {v['torch']} there sees no "
                f"CUDA device (CUDA build: {v['cuda']})" for n, v in zip(nodes, views)
                if not v["available"]]
    if problems:
        raise ClusterRefused(
            f"{what} asks for GPUs; nothing was started:\n  " + "\n  ".join(problems)
            + "\n  Install a CUDA build of torch on that node (and its driver), start it "
            "without --num-gpus, or ask for no GPU")
    return views


def data_roots(plan) -> tuple[str, ...]:
    """The folders the plan reads in place (``data.root`` of its evaluation and training
    sets; none for the generated quickstart data)."""
    sets = [*plan.images.values(), *(g.images for g in plan.head_groups)]
    return tuple(sorted({s.root for s in sets if s.root and "://" not in s.root}))


def store_roots(plan) -> tuple[str, ...]:
    """The data roots in an object store that the training workers read
    (``harness.data.sources``)."""
    return tuple(sorted({g.images.root for g in plan.head_groups
                         if g.images.root and "://" in g.images.root}))


def check_nodes(roots: tuple[str, ...], storage: Storage, trains: bool,
                store_roots_of: tuple[str, ...] = ()) -> list[NodeView]:
    """Refuse (``ClusterRefused``) a run that some node cannot do; see the module docstring.
    ``trains``: Ray Train or Tune will run (the storage must be visible everywhere)."""
    if len(alive_nodes()) <= 1:
        return []
    views = look_from_every_node(roots + (store_roots_of if trains else ()), storage,
                                 with_storage=trains)
    problems = [f"node {v.node_id[:12]} ({v.host}) has no {', '.join(local)}: "
                "data.root is read in place, so every node needs it at the same path (mount "
                "it, copy it there, or put it in an object store: data.root=s3://...)"
                for v in views for local in [[r for r in v.missing_roots if "://" not in r]]
                if local]
    problems += [f"node {v.node_id[:12]} ({v.host}) cannot read {r.split('?')[0]}/train: the "
                 "head training's workers stream their images from there. Give that node the "
                 "object store's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"
                 for v in views for r in v.missing_roots if "://" in r]
    problems += [f"node {v.node_id[:12]} ({v.host}) cannot read storage.uri {storage.uri} "
                 f"({v.storage_error}): Ray Train and Tune write their checkpoints there from "
                 "every node. Set storage.uri to a location every node reaches: an object "
                 "store (s3://bucket/prefix, gs://...) or a shared folder"
                 for v in views if v.storage_error]
    if problems:
        raise ClusterRefused("this cluster cannot run the spec; nothing was started:\n  "
                             + "\n  ".join(problems))
    return views
