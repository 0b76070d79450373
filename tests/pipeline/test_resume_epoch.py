"""A resumed head fit starts at the epoch after its last checkpoint, with the heads, the
optimisers, the schedules and the history of that checkpoint: it neither re-trains the last
finished epoch nor skips one (harness.pipeline.heads._resume)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from harness.pipeline import heads, ray_runtime

ray_runtime.prepare_environment(None)      # before ray is imported (loopback-only Ray)
import ray.train  # noqa: E402


def _parts(seed: int):
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(4, 3, 1)
    optim = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(optim, 0.5)
    head(torch.rand(2, 4, 3, 3)).sum().backward()
    optim.step()
    sched.step()
    return head, optim, sched


def test_a_fit_resumes_after_the_last_finished_epoch(tmp_path, monkeypatch):
    head, optim, sched = _parts(0)
    state = {"epoch": 2, "history": [{"epoch": e} for e in range(3)],
             "heads": {"lcam_fm": head.state_dict()}, "optims": {"lcam_fm": optim.state_dict()},
             "scheds": {"lcam_fm": sched.state_dict()}}
    torch.save(state, tmp_path / "heads.pt")
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))
    fresh, fresh_optim, fresh_sched = _parts(1)
    trainer = SimpleNamespace(heads={"lcam_fm": fresh}, optims={"lcam_fm": fresh_optim},
                              scheds={"lcam_fm": fresh_sched}, history=[])
    assert heads._resume(trainer, "cpu") == 3              # epochs 0-2 done: 3 is next
    assert trainer.history == state["history"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 head.state_dict().values()))
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_optim.state_dict()["state"][0]["momentum_buffer"].equal(
        optim.state_dict()["state"][0]["momentum_buffer"])


def test_a_fit_without_a_checkpoint_starts_at_epoch_zero(monkeypatch):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert heads._resume(SimpleNamespace(heads={}, optims={}, scheds={}, history=[]), "cpu") == 0
