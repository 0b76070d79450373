"""What a run asks of the Ray cluster, checked against what the cluster has before anything starts.

A Ray task or Train worker that asks for a resource no node has (a GPU on a CPU-only cluster,
more CPUs than any node holds) is not an error in Ray: it waits forever, silently. So once
Ray is up, and before any MLflow run, training or shard exists, ``check(plan, nodes)``
compares every request of the plan with the cluster's live nodes and refuses (exit 2, with
the numbers) what can never be scheduled:

- a shard task (and each cell's analysis task) needs ``sharding.cpus_per_task`` CPUs and
  ``sharding.gpus_per_task`` GPUs on one node;
- a head-training fit needs ``train.workers`` workers at once (Ray Train places them as a
  group, across nodes), each with its CPUs and, with ``train.use_gpu``, one GPU;
- a Tune trial needs ``sweep.cpus_per_trial`` CPUs and ``sweep.gpus_per_trial`` GPUs.

The check counts the cluster's nodes as they are now: an autoscaling cluster that would add
the nodes later must be sized first (docs/cluster.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from harness.errors import UserError
from harness.pipeline.plan import Plan


class ResourcesRefused(UserError):
    """The cluster can never run what the spec asks for."""


@dataclass(frozen=True)
class Demand:
    """``count`` units needed at once, each of ``cpus`` CPUs and ``gpus`` GPUs on one node."""

    what: str          # e.g. "each shard task"
    field: str         # the spec field that sets it
    cpus: float
    gpus: float
    count: int = 1


def demands(plan: Plan) -> list[Demand]:
    """Every request of a run's plan (see the module docstring)."""
    ev = plan.evaluation
    out = [Demand("each shard task", "sharding.cpus_per_task/gpus_per_task",
                  ev.cpus_per_task, ev.gpus_per_task)]
    for g in plan.head_groups:
        out.append(Demand(f"the head training of {g.backbone} ({g.workers} worker(s))",
                          "train.workers/cpus_per_worker/use_gpu", g.cpus,
                          1.0 if g.use_gpu else 0.0,
                          g.workers))
    return out


def live_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU) of every live node of the connected Ray cluster."""
    import ray
    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def fits(d: Demand, nodes: list[dict[str, float]]) -> int:
    """How many units of ``d`` the nodes can hold at once (each unit on one node)."""
    total = 0
    for n in nodes:
        per_node = [math.floor(n["CPU"] / d.cpus + 1e-9)] if d.cpus > 0 else []
        if d.gpus > 0:
            per_node.append(math.floor(n["GPU"] / d.gpus + 1e-9))
        total += min(per_node) if per_node else d.count
    return total


def problems(wanted: list[Demand], nodes: list[dict[str, float]]) -> list[str]:
    """What can never be scheduled, each named with the numbers (empty: all can)."""
    cpus, gpus = sum(n["CPU"] for n in nodes), sum(n["GPU"] for n in nodes)
    cluster = (f"the cluster has {len(nodes)} node(s) with {cpus:g} CPU and {gpus:g} GPU in "
               f"all (largest node: {max((n['CPU'] for n in nodes), default=0):g} CPU, "
               f"{max((n['GPU'] for n in nodes), default=0):g} GPU)")
    out = []
    for d in wanted:
        if fits(d, nodes) < d.count:
            out.append(f"{d.field}: {d.what} needs {d.cpus:g} CPU and {d.gpus:g} GPU on one "
                       f"node{f', {d.count} at once' if d.count > 1 else ''}, but {cluster}. "
                       "Lower the request or add nodes")
    return out


def slots(d: Demand, nodes: list[dict[str, float]],
          reserved: list[Demand] = ()) -> int:
    """How many units of ``d`` (an evaluation worker, say) fit on ``nodes`` next to
    ``reserved`` (head fits that are running or about to start), each reserved unit taken
    from the node with the most room for it, as Ray would place it."""
    room = [dict(n) for n in nodes]
    for r in reserved:
        for _ in range(r.count):
            fits_here = [n for n in room if n["CPU"] + 1e-9 >= r.cpus and n["GPU"] + 1e-9 >= r.gpus]
            if not fits_here:
                return 0                  # the fit waits for room: add no workers beside it
            n = max(fits_here, key=lambda m: (m["GPU"] - r.gpus, m["CPU"] - r.cpus))
            n["CPU"] -= r.cpus
            n["GPU"] -= r.gpus
    return fits(Demand(d.what, d.field, d.cpus, d.gpus, 1), room)


def check(wanted: list[Demand], nodes: list[dict[str, float]] | None = None) -> None:
    """Raise ``ResourcesRefused`` for requests the cluster can never schedule."""
    found = problems(wanted, live_nodes() if nodes is None else nodes)
    if found:
        raise ResourcesRefused("nothing was started: " + "; ".join(found))
