"""What every node of a multi-node Ray cluster must have, checked before anything starts.

A cluster need not share a filesystem (``harness.data.storage``): each node builds its own
generated inputs, and the shard tasks return their rows to the driver. Two things cannot be
rebuilt on a node, so one small task per alive node (pinned to it, no CPU asked) looks:

- the **data read in place**: every ``data.root`` of the plan (ImageNet folders) must exist
  on every node that may run a shard or a training worker; a node that lacks one is named;
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


def _look(roots: tuple[str, ...], storage: Storage, probe: str | None) -> NodeView:
    import ray
    missing = tuple(r for r in roots if not Path(r).is_dir())
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


def data_roots(plan) -> tuple[str, ...]:
    """The folders the plan reads in place (``data.root`` of its evaluation and training
    sets; none for the generated quickstart data)."""
    sets = [*plan.images.values(), *(g.images for g in plan.head_groups)]
    return tuple(sorted({s.root for s in sets if s.root}))


def check_nodes(roots: tuple[str, ...], storage: Storage, trains: bool) -> list[NodeView]:
    """Refuse (``ClusterRefused``) a run that some node cannot do; see the module docstring.
    ``trains``: Ray Train or Tune will run (the storage must be visible everywhere)."""
    if len(alive_nodes()) <= 1:
        return []
    views = look_from_every_node(roots, storage, with_storage=trains)
    problems = [f"node {v.node_id[:12]} ({v.host}) has no {', '.join(v.missing_roots)}: "
                "data.root is read in place, so every node needs it at the same path (mount "
                "it, or copy it there)" for v in views if v.missing_roots]
    problems += [f"node {v.node_id[:12]} ({v.host}) cannot read storage.uri {storage.uri} "
                 f"({v.storage_error}): Ray Train and Tune write their checkpoints there from "
                 "every node. Set storage.uri to a location every node reaches: an object "
                 "store (s3://bucket/prefix, gs://...) or a shared folder"
                 for v in views if v.storage_error]
    if problems:
        raise ClusterRefused("this cluster cannot run the spec; nothing was started:\n  "
                             + "\n  ".join(problems))
    return views
