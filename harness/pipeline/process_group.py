"""The head training's process group, kept off the network when one node holds every worker.

Ray Train joins its workers with ``torch.distributed.init_process_group("env://")``, whose
rendezvous is a ``TCPStore`` on rank 0: torch binds that server to every interface
(``[::]``, whatever ``MASTER_ADDR`` says), so a laptop's fit listens to its whole network
while the rest of a local Ray listens on 127.0.0.1 only. ``LoopbackTorchConfig`` is Ray
Train's ``TorchConfig`` with one change: when every worker of the group runs on one node,
the rendezvous is a ``FileStore`` in a fresh folder of that node (``file://``: no socket),
and gloo and NCCL are told to use the loopback interface (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``) for their own connections between ranks. On several nodes nothing
changes (the workers must reach each other).

It reuses Ray Train's own worker-side steps (``_set_torch_distributed_env_vars``,
``_setup_torch_process_group``: private to Ray 2.60, pinned by the project's requirements),
so that LOCAL_RANK and the NCCL error handling are set as Ray sets them.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

import ray
from ray.train.torch.config import TorchConfig, _TorchBackend


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _fresh_store() -> str:
    """A FileStore path in a new folder of this node (the file itself must not exist yet)."""
    return os.path.join(tempfile.mkdtemp(prefix="lcam-process-group-"), "store")


def _loopback_interfaces() -> None:
    """Point gloo's and NCCL's own sockets at the loopback interface, where it is named."""
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)


class _OneNodeTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        nodes = set(worker_group.execute(_node_id))
        if len(nodes) > 1 or backend_config.backend is None:
            return super().on_start(worker_group, backend_config)
        from ray.train.torch.config import (V1WorkerGroup, _set_torch_distributed_env_vars,
                                            _setup_torch_process_group)
        store = self._store = worker_group.execute_single(0, _fresh_store)
        worker_group.execute(_loopback_interfaces)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            i, _setup_torch_process_group, backend=backend_config.backend, world_rank=i,
            world_size=len(worker_group), init_method=f"file://{store}",
            timeout_s=backend_config.timeout_s) for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        super().on_shutdown(worker_group, backend_config)
        store = getattr(self, "_store", None)
        if store is not None:
            worker_group.execute_single(0, _remove_store, store)


def _remove_store(store: str) -> None:
    import shutil
    shutil.rmtree(os.path.dirname(store), ignore_errors=True)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose one-node groups meet through a file, not a socket (module
    docstring); ``backend`` must be given (``heads.process_group_backend``)."""

    @property
    def backend_cls(self):
        return _OneNodeTorchBackend
