"""The README's "On a Ray cluster" commands, run as written, in a fresh copy of the project.

The fenced block of that section is read from the README and run by ``bash -e`` in a plain
shell (a fresh HOME: no Ray token yet) from the project folder, so the README and this test
cannot drift apart. Then, on the head it started:
- every socket that the head and the MLflow server opened listens on 127.0.0.1 only
  (``psutil``'s view of the kernel's tables, compared before and after);
- a client without the token is refused, by the job API and by the dashboard's HTTP API;
- the job's runs are in the MLflow server and its shards in ``./.harness-cache``, and its
  numbers are the smoke run's pinned ones (``golden/smoke.json``); with one shard file
  deleted, the same submit again recomputes that one alone (every other shard file
  untouched) and reports the same numbers;
- a submit without ``tracking.uri`` and ``storage.uri`` is refused (exit 2 inside the job),
  naming both, instead of writing into Ray's temporary copy of the project.
Afterwards the test stops exactly what the README's shell started: every process whose
environment holds that shell's own (unique) HOME, the Ray head and the MLflow server among
them (not ``ray stop``, which would stop every Ray on the machine, nor whatever listens on
port 5000). The README's commands use fixed ports (6379, 8265, 10001, 5000): where another
process already listens on one, the module is skipped, naming it, rather than disturbing it.

The copy's cache starts with the heads of the session's local smoke run (``smoke_project``,
tests/conftest.py: the same spec, so the same heads), so the job evaluates on the
cluster without training them again; training heads in a ``ray job submit`` job is
``test_two_nodes.py``'s (on two nodes). Should that local run have failed, the job trains
them itself.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pytest
from mlflow.tracking import MlflowClient

import golden
from services import REPO, kill_processes_with, user_env, workspace

pytestmark = pytest.mark.slow

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def readme_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    body = text[text.index(f"## {section}"):]
    body = body[:body.index("\n## ")] if "\n## " in body else body
    m = re.search(r"```bash\n(.*?)```", body, re.S)
    assert m, f"no bash block under '## {section}'"
    return m.group(1)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [c.strip() for c in re.sub(r"\\\n\s*", "", block).splitlines()
            if c.strip() and not c.strip().startswith("#")]


def listening() -> dict[tuple[str, int], int]:
    """{(address, port): pid} of every TCP socket in LISTEN state on the machine."""
    return {(c.laddr.ip, c.laddr.port): c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


README_PORTS = (6379, 8265, 10001, 5000)


def stop_everything(env) -> None:
    """Stop what the README's shell started: the processes that inherited its HOME."""
    for _ in range(3):                    # a dying raylet may still start a worker
        kill_processes_with("HOME", env["HOME"])
        time.sleep(1)


def pinned_smoke() -> dict:
    return golden.pinned("smoke")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smoke_project):
    block = readme_block("On a Ray cluster")
    submit = next(c for c in commands(block) if c.startswith("ray job submit"))
    root = workspace(tmp_path_factory.mktemp("cluster"))
    for head in smoke_project["heads"]:            # the same spec's heads, trained locally
        target = root / ".harness-cache" / head.relative_to(
            smoke_project["root"] / ".harness-cache")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(head, target)
    env = user_env(root.parent / "home")
    before = listening()
    taken = sorted({port for (_, port) in before} & set(README_PORTS))
    if taken:
        pytest.skip(f"port(s) {taken} already in use by another process: the README's "
                    "cluster commands need them")
    try:
        first = subprocess.run(["bash", "-e", "-c", block], cwd=root, env=env,
                               capture_output=True, text=True, timeout=900)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        opened = {addr: pid for addr, pid in listening().items() if addr not in before}
        yield {"root": root, "env": env, "first": first, "opened": opened, "submit": submit}
    finally:
        stop_everything(env)


def shell(cluster, command: str, **env) -> subprocess.CompletedProcess:
    """One more command in the README's shell (its exported variables, its HOME)."""
    exports = re.findall(r"^export (.+)$", readme_block("On a Ray cluster"), re.M)
    script = "".join(f"export {e}\n" for e in exports) + command
    return subprocess.run(["bash", "-e", "-c", script], cwd=cluster["root"],
                          env={**cluster["env"], **env}, capture_output=True, text=True,
                          timeout=900)


def smoke_runs(client):
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = sorted((r for r in runs if r.data.tags.get("harness_role") == "benchmark"),
                     key=lambda r: r.info.start_time)
    return parents, [r for r in runs if r.data.tags.get("harness_role") == "method"]


def test_the_job_succeeds_and_its_results_outlive_it(cluster):
    assert "succeeded" in cluster["first"].stdout
    assert "MLflow: http://127.0.0.1:5000" in cluster["first"].stdout
    parents, children = smoke_runs(MlflowClient("http://127.0.0.1:5000"))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 16 and all(c.info.status == "FINISHED" for c in children)
    shards = list((cluster["root"] / ".harness-cache" / "shards").glob("*/*/shard-*.parquet"))
    assert len(shards) == 32                      # 16 cells x 2 shards of 6 images
    got = {c.data.tags["run_key"]: c.data.metrics for c in children}
    assert not golden.differences(got, pinned_smoke())


def test_every_server_listens_on_loopback_only(cluster):
    opened = cluster["opened"]
    ports = {port for _, port in opened}
    assert {6379, 8265, 10001, 5000} <= ports, sorted(ports)
    exposed = sorted((ip, port) for ip, port in opened if ip not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_a_client_without_the_token_is_refused(cluster):
    other_home = cluster["root"].parent / "stranger"
    other_home.mkdir(exist_ok=True)
    refused = subprocess.run(["ray", "job", "list", "--address", "http://127.0.0.1:8265"],
                             env=user_env(other_home, RAY_AUTH_MODE="token"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
    allowed = shell(cluster, "ray job list --address http://127.0.0.1:8265")
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_a_second_submit_reuses_the_cache(cluster):
    """Delete one shard file of the first job: the same submit recomputes that one only
    (every other shard file untouched) and reports the same numbers."""
    shards = sorted((cluster["root"] / ".harness-cache" / "shards").glob("*/*/shard-*.parquet"))
    victim = next(p for p in shards if "/gradcampp-" in str(p))
    stamps = {p: p.stat().st_mtime_ns for p in shards if p != victim}
    victim.unlink()
    time.sleep(0.01)
    again = shell(cluster, cluster["submit"])
    assert again.returncode == 0 and "succeeded" in again.stdout, again.stdout[-3000:]
    assert victim.exists(), "the deleted shard was not recomputed"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "finished shards were redone"
    parents, children = smoke_runs(MlflowClient("http://127.0.0.1:5000"))
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    by_parent = {}
    for c in children:
        by_parent.setdefault(c.data.tags["mlflow.parentRunId"], {})[c.data.tags["run_key"]] = \
            {k: v for k, v in c.data.metrics.items() if k.startswith(("AD_", "IC_", "FW"))}
    first, second = (by_parent[p.info.run_id] for p in parents)
    assert first == second


def test_a_job_without_lasting_locations_is_refused(cluster):
    bare = re.sub(r" (tracking|storage)\.uri=\S+", "", cluster["submit"])
    assert "uri=" not in bare
    proc = shell(cluster, bare)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in out.lower(), out[-3000:]
    assert "running as a Ray job" in out and "storage.uri=" in out and "tracking.uri=" in out
    assert "Traceback" not in out
