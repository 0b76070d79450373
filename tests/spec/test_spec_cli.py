"""Specs and the command line: the broken-spec corpus, overrides, defaults, job files, ``ls``.

The corpus ``tests/specs/bad/*.yaml``: each file's first line is ``# expect: A; B; ...``, the
substrings (field paths, usually with their message) that the report must contain. Every
file goes through ``python -m harness validate`` (one subprocess for all of them) and
``run`` (``harness.cli.main`` in this process, from an empty working directory; a few files
also as a subprocess): exit 2, the expected text, no traceback, and nothing created (no
MLflow store, no cache, no Ray folders). No Ray is ever started here.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import backbones
import methods
from harness import cli
from harness.spec import SpecError, Spec, load_spec
from services import user_env

REPO = Path(__file__).resolve().parents[2]
CORPUS = sorted((REPO / "tests" / "specs" / "bad").glob("*.yaml"))
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
EMBEDDED = ("tiny_vgg", "tiny_resnet")


def expectations(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name}: first line must be '# expect: ...'"
    return [e.strip() for e in first[len("# expect:"):].split(";") if e.strip()]


def stores(workdir: Path) -> dict[str, str]:
    return {"HARNESS_CACHE_DIR": str(workdir / "cache"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}


def harness(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` in an empty working directory with private stores."""
    cwd = workdir / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd,
                          env=user_env(**stores(workdir)), capture_output=True, text=True,
                          timeout=120)


def harness_here(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """``harness.cli.main(ARGS)`` in this process, as ``harness`` does it in a subprocess
    (empty working directory, private stores; the output captured)."""
    cwd = workdir / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(stores(workdir))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """\
schema: 1
backbones: [vgg16]
methods:
  - name: gradcam
  - name: rise
    params: {n_masks: 10}
  - name: lcam_fm
  - name: lcam_fm
    id: lcam_fm_ce
    train: {lambda1: 0, lambda2: 0}
"""


# -- the corpus ------------------------------------------------------------------------------
def test_corpus_is_large_and_annotated():
    assert len(CORPUS) >= 25
    for path in CORPUS:
        assert expectations(path)


# Corpus files also run as ``python -m harness run`` subprocesses: one is enough, since every
# file takes the same path there (the spec refused by ``cli.main``, exit 2, before anything
# is created), which the in-process runs check for each file's own problems.
SUBPROCESS_RUNS = 1


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory):
    """``run`` on every corpus file (in process; the first also as a subprocess), and one
    ``validate`` subprocess of all of them (the subprocesses two at a time)."""
    root = tmp_path_factory.mktemp("corpus")
    runs = {path.name: (root / f"run{i:02d}", harness_here(["run", str(path)],
                                                          root / f"run{i:02d}"))
            for i, path in enumerate(CORPUS)}

    def one(i_path):
        i, path = i_path
        workdir = root / f"sub{i:02d}"
        return path.name + " (subprocess)", (workdir, harness(["run", str(path)], workdir))

    with ThreadPoolExecutor(2) as pool:
        validate = pool.submit(harness, ["validate", *map(str, CORPUS)], root / "validate")
        runs.update(pool.map(one, enumerate(CORPUS[:SUBPROCESS_RUNS])))
        return runs, validate.result()


def sections(output: str) -> dict[str, str]:
    """Split a multi-file report into {file name: its section}."""
    out, current = {}, None
    for line in output.splitlines():
        m = re.match(r"^(\S.*?\.yaml): \d+ problems?; nothing was started\.$", line)
        if m:
            current = Path(m.group(1)).name
            out[current] = ""
        if current:
            out[current] += line + "\n"
    return out


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_validate(path, corpus_runs):
    _, result = corpus_runs
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    report = sections(result.stderr).get(path.name)
    assert report, f"no report for {path.name} in:\n{result.stderr}"
    for expected in expectations(path):
        assert expected in report, f"{expected!r} not in:\n{report}"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_run_starts_nothing(path, corpus_runs):
    runs, _ = corpus_runs
    found = [runs[path.name]] + ([runs[path.name + " (subprocess)"]]
                                  if path in CORPUS[:SUBPROCESS_RUNS] else [])
    for workdir, result in found:
        out = result.stdout + result.stderr
        assert result.returncode == 2, out
        assert "Traceback" not in out
        assert "nothing was started" in out
        for expected in expectations(path):
            assert expected in out
        assert list((workdir / "cwd").iterdir()) == []       # no mlruns/, mlflow.db, ray dirs
        assert not (workdir / "cache").exists()
        assert not (workdir / "mlflow.db").exists()


# -- loading, defaults, overrides ------------------------------------------------------------
def test_defaults_resolved(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    assert isinstance(spec, Spec) and spec.name == "spec" and spec.seed == 0
    assert spec.path == str(tmp_path / "spec.yaml")
    assert spec.backbones[0].weights == "IMAGENET1K_V1"
    assert spec.train.epochs == 7 and spec.train.lr == 1e-4 and spec.train.lambdas == (0.01, 2.0, 1.5, 0.3)
    assert spec.evaluation.keep_fractions == [1.0, 0.5, 0.15]
    assert spec.evaluation.preset == "paper" and spec.evaluation.protocol_preset().name == "paper"
    assert spec.tracking.experiment == "spec" and spec.ray.address is None
    ids = [m.id for m in spec.methods]
    assert ids == ["gradcam", "rise", "lcam_fm", "lcam_fm_ce"]
    by_id = {m.id: m for m in spec.methods}
    assert by_id["gradcam"].variant == "paper" and by_id["gradcam"].params == {}
    assert by_id["rise"].params["n_masks"] == 10 and by_id["rise"].params["cell"] == 7
    assert by_id["lcam_fm"].display_name == "L-CAM-Fm"
    assert by_id["lcam_fm_ce"].display_name == "L-CAM-Fm*"          # Table 1's starred rows
    assert by_id["lcam_fm"].learned and not by_id["rise"].learned
    assert len(spec.pairs()) == 4


def test_scientific_notation_strings_are_accepted(tmp_path):
    # PyYAML reads 1e-4 as the string '1e-4'; float fields accept and convert it.
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    spec = load_spec(write(tmp_path, BASE + "train: {lr: 1e-4, lr_decay: 5E-1}\n"))
    assert spec.train.lr == 1e-4 and isinstance(spec.train.lr, float) and spec.train.lr_decay == 0.5
    assert load_spec(write(tmp_path, BASE), ["train.lr=3e-2"]).train.lr == 0.03
    with pytest.raises(SpecError) as err:            # integers are never written as 1e3
        load_spec(write(tmp_path, BASE + "train: {epochs: 1e3}\n"))
    assert err.value.problems[0][0] == "train.epochs"


def test_overrides(tmp_path):
    spec = load_spec(write(tmp_path, BASE), ["train.epochs=2", "methods[1].params.n_masks=8",
                                             "data.limit=20", "tracking.tags={a: b}", "seed=3"])
    assert spec.train.epochs == 2 and spec.methods[1].params["n_masks"] == 8
    assert spec.data.limit == 20 and spec.tracking.tags == {"a": "b"} and spec.seed == 3


def test_bad_override_paths_are_reported_together(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, BASE), ["methods[9].name=x", "methods[0].name.x=1", "noequals",
                                          "train.epoch=2", "backbones.name=x"])
    text = err.value.format()
    assert "5 problems" in text
    assert "methods[9]: override 'methods[9].name=x': there is no methods[9]" in text
    assert "methods[0].name: override 'methods[0].name.x=1': methods[0].name is 'gradcam'" in text
    assert "overrides: 'noequals' is not key=value" in text
    assert "train.epoch: unknown key 'epoch'. Did you mean 'epochs'?" in text
    assert "(set by override 'train.epoch=2')" in text
    assert "backbones: override 'backbones.name=x'" in text


def test_every_problem_reported_at_once(tmp_path):
    path = write(tmp_path, BASE.replace("name: gradcam", "name: grad-cam")
                 + "train: {epochs: 0}\nevaluation: {keep_fractions: [1.0, 15]}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    e = err.value
    assert [w for w, _ in e.problems] == ["methods[0].name", "train.epochs",
                                          "evaluation.keep_fractions[1]"]
    lines = e.format().splitlines()
    assert lines[0] == f"{path}: 3 problems; nothing was started."
    assert lines[1].startswith("  methods[0].name: unknown method 'grad-cam'. Did you mean 'gradcam'?")
    assert lines[3] == ("  evaluation.keep_fractions[1]: 15 is not a fraction in (0, 1]. "
                        "To keep the top 15%, write 0.15.")


def test_train_for_merges_global_backbone_method(tmp_path):
    spec = load_spec(write(tmp_path, BASE.replace(
        "backbones: [vgg16]", "backbones:\n  - name: vgg16\n    train: {epochs: 3, lr: 0.5}\n"
        "    methods: [gradcam, lcam_fm_ce]")
        + "train: {epochs: 9, batch_size: 8}\n"))
    b = spec.backbones[0]
    t = spec.train_for(b, spec.method("lcam_fm_ce"))
    assert (t.epochs, t.batch_size, t.lr, t.lambda1, t.lambda2) == (3, 8, 0.5, 0.0, 0.0)
    assert t.ce_only and not spec.train_for(b, spec.method("lcam_fm")).ce_only
    assert [m.id for _, m in spec.pairs()] == ["gradcam", "lcam_fm_ce"]


def test_to_dict_round_trips_and_fingerprint(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "evaluation: {preset: {fill: mean}}\n"))
    assert spec.evaluation.preset == {"soft": True, "fill": "mean", "score": "prob"}
    assert spec.evaluation.protocol_preset().fill == "mean"
    dumped = write(tmp_path, yaml.safe_dump(spec.to_dict()), "dumped.yaml")
    again = load_spec(dumped)
    assert again.to_dict() == spec.to_dict() | {"name": "spec"}
    assert again.fingerprint() == spec.fingerprint()
    tagged = load_spec(dumped, ["tracking.experiment=other", "ray.address=auto"])
    assert tagged.fingerprint() == spec.fingerprint()               # tracking/ray excluded
    assert load_spec(dumped, ["train.epochs=2"]).fingerprint() != spec.fingerprint()


def test_paths_relative_to_file_or_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "head.pt").write_text("x")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "other.pt").write_text("x")
    (tmp_path / "sub" / "list.txt").write_text("a.png 1  # comment\n\nb.png 2\n")
    monkeypatch.chdir(tmp_path / "cwd")
    text = ("schema: 1\nbackbones: [vgg16]\ndata: {list_file: list.txt}\n"
            "methods:\n  - name: lcam_img\n    checkpoint: head.pt\n")
    spec = load_spec(write(tmp_path / "sub", text))
    assert spec.methods[0].checkpoint == str(tmp_path / "sub" / "head.pt")
    assert spec.data.list_file == str(tmp_path / "sub" / "list.txt")
    spec = load_spec(tmp_path / "sub" / "spec.yaml", ["methods[0].checkpoint=other.pt"])
    assert spec.methods[0].checkpoint == str(tmp_path / "cwd" / "other.pt")


def test_imagenet_root_layout(tmp_path):
    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    text = BASE + "data: {kind: imagenet, root: imagenet}\n"
    with pytest.raises(SpecError) as err:          # lcam heads need train/
        load_spec(write(tmp_path, text))
    assert "has no train/" in err.value.format()
    (tmp_path / "h.pt").write_text("x")
    only_ckpt = ("schema: 1\nbackbones: [vgg16]\ndata: {kind: imagenet, root: imagenet, "
                 "list_file: builtin:Evaluation_2000}\nmethods:\n  - {name: lcam_fm, checkpoint: h.pt}\n")
    assert load_spec(write(tmp_path, only_ckpt)).data.root == str(root)
    (root / "train").mkdir()
    assert load_spec(write(tmp_path, text)).data.list_file is None


def test_gpu_requests_need_a_gpu_for_local_ray(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    text = BASE + "train: {use_gpu: true}\nsharding: {gpus_per_task: 1}\n"
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    assert [w for w, _ in err.value.problems] == ["train.use_gpu", "sharding.gpus_per_task"]
    assert "this machine has no GPU" in err.value.format()
    assert load_spec(write(tmp_path, text), ["ray.address=auto"]).train.use_gpu
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")     # inside a Ray job
    assert load_spec(write(tmp_path, text)).sharding.gpus_per_task == 1


def test_weights_resolution(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_text("x")
    text = ("schema: 1\nmethods: [gradcam]\nbackbones:\n  - {name: vgg16, weights: null}\n"
            "  - {name: resnet50, weights: w.pth}\n  - {name: vgg16_7x7, weights: IMAGENET1K_FEATURES}\n")
    spec = load_spec(write(tmp_path, text))
    assert [b.weights for b in spec.backbones] == [None, str(tmp_path / "w.pth"), "IMAGENET1K_FEATURES"]
    # A backbone without a torchvision weights enum (the embedded ones): 'embedded' by default.
    entry = backbones.REGISTRY.get("vgg16")
    fake = type(entry)("fake_tiny", entry.factory, {"family": "embedded"})
    monkeypatch.setitem(backbones.REGISTRY._entries, "fake_tiny", fake)
    spec = load_spec(write(tmp_path, "schema: 1\nbackbones: [fake_tiny]\nmethods: [gradcam]\n"))
    assert spec.backbones[0].weights == "embedded"
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, "schema: 1\nmethods: [gradcam]\nbackbones:\n"
                                  "  - {name: fake_tiny, weights: IMAGENET1K_V1}\n"))
    assert "backbones[0].weights: unknown weights name 'IMAGENET1K_V1'" in err.value.format()


def test_registry_entries_are_all_usable(tmp_path):
    """Every registered method (each variant) and backbone is accepted by a spec."""
    entries = "".join(f"  - {{name: {n}, id: {n}-{v}, variant: {v}}}\n"
                      for n in methods.names() for v in methods.method_class(n).variants)
    text = "schema: 1\nbackbones:\n" + "".join(f"  - {{name: {b}, weights: null}}\n"
                                                for b in backbones.names()) + "methods:\n" + entries
    spec = load_spec(write(tmp_path, text))
    assert len(spec.pairs()) == len(backbones.names()) * len(spec.methods)


# -- job files -------------------------------------------------------------------------------
def job_overrides(path: Path, tmp_path: Path) -> list[str]:
    from harness.spec.includes import resolve
    raw = resolve(yaml.safe_load(path.read_text()), path,
                  lambda base: yaml.safe_load(base.read_text()))      # with its include: bases
    out = []
    if raw.get("data", {}).get("kind") == "imagenet":
        (tmp_path / "imagenet" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imagenet" / "val").mkdir(parents=True, exist_ok=True)
        out += [f"data.root={tmp_path / 'imagenet'}", "ray.address=auto"]   # as on a cluster
    for i, b in enumerate(raw["backbones"]):
        name = b["name"] if isinstance(b, dict) else b
        if name in EMBEDDED and name not in backbones.names():       # until backbones.embedded lands
            out.append(f"backbones[{i}].name={['vgg16', 'resnet50'][i % 2]}")
    return out


def test_jobs_exist():
    names = {p.name for p in JOBS}
    assert {"quickstart.yaml", "smoke.yaml", "paper_text_vgg16.yaml", "paper_text_resnet50.yaml",
            "paper_text_vgg16_7x7.yaml", "table1_vgg16.yaml", "table1_resnet50.yaml",
            "table1_vgg16_7x7.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_validates(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# python -m harness run", "# ray job submit")), first
    assert f"jobs/{path.name}" in first
    spec = load_spec(path, job_overrides(path, tmp_path))
    assert spec.name == path.stem
    if path.stem in ("quickstart", "smoke"):
        assert [m.id for m in spec.methods] == ["gradcam", "gradcampp", "scorecam", "rise",
                                                "lcam_fm", "lcam_img", "lcam_fm_ce", "lcam_img_ce"]
        assert spec.method("lcam_img_ce").display_name == "L-CAM-Img*"


def test_cli_validate_and_ls(tmp_path):
    quick = REPO / "jobs" / "quickstart.yaml"
    with ThreadPoolExecutor(2) as pool:                   # two independent processes
        listed = pool.submit(harness, ["ls"], tmp_path / "ls")
        res = harness(["validate", str(quick), *job_overrides(quick, tmp_path)], tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[0] == f"{quick}: OK (2 backbones x 8 methods)"  # + plan
        res = listed.result()
    assert res.returncode == 0, res.stderr
    for name in [*methods.names(), *backbones.names(), *(p.name for p in JOBS)]:
        assert name in res.stdout, name


def test_validate_says_where_results_go(tmp_path, monkeypatch):
    """The plan ends with the results, node cache and MLflow store a run would use: a local
    storage.uri holds the cache too; an s3:// one keeps the cache node-local."""
    from harness.cli.validate import locations
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    quick = REPO / "jobs" / "quickstart.yaml"
    local = load_spec(quick, [f"storage.uri={tmp_path / 'results'}"])
    assert locations(local) == (f"results: {tmp_path / 'results'}; node cache: "
                                f"{tmp_path / 'results'}; MLflow: http://127.0.0.1:5000")
    remote = load_spec(quick, ["storage.uri=s3://bucket/run", f"storage.cache={tmp_path}/c",
                               "tracking.uri=sqlite:///x.db"])
    assert locations(remote) == (f"results: s3://bucket/run; node cache: {tmp_path}/c; "
                                 "MLflow: sqlite:///x.db")
    assert "HARNESS_CACHE_DIR" not in os.environ          # validate chooses nothing


# -- the CLI in-process (no Ray: the runner is a stand-in) -----------------------------------
def test_cli_run_calls_runner_and_reports_failures(tmp_path, monkeypatch, capsys):
    import types

    from harness.errors import UserError
    spec_path = write(tmp_path, BASE)
    calls = []
    fake = types.ModuleType("harness.pipeline.runner")

    class InputRefused(UserError):           # as harness.pipeline.runner's: exit 2
        pass

    def run_benchmark(spec):
        calls.append(spec)
        if spec.seed == 1:
            raise RuntimeError("shard 3 failed\nmore detail")
        if spec.seed == 2:
            raise InputRefused("list.txt:3: 'a.png' not found under /data/val\nnothing was "
                               "started: fix the data")
    fake.run_benchmark = run_benchmark
    fake.InputRefused = InputRefused
    monkeypatch.setitem(sys.modules, "harness.pipeline.runner", fake)
    assert cli.main(["run", str(spec_path), "train.epochs=1"]) == 0
    assert calls[0].train.epochs == 1
    assert cli.main(["run", str(spec_path), "seed=1"]) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: shard 3 failed" in err and "Traceback" not in err
    assert cli.main(["run", str(spec_path), "seed=1", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["run", str(spec_path), "seed=2"]) == 2          # bad data, found first
    err = capsys.readouterr().err
    assert "a.png' not found" in err and "nothing was started" in err and "Traceback" not in err
    assert cli.main(["run", str(spec_path), "train.epochs=0"]) == 2
    assert len(calls) == 4


def test_cli_imports_only_the_command_it_runs(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "hello_cmd.py").write_text('def add_arguments(p):\n    p.add_argument("who")\n'
                                      'def main(args):\n    print("hello", args.who)\n'
                                      '    return 0\n')
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setitem(cli.COMMANDS, "hello", ("hello_cmd", "say hello"))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("no_such_module_xyz", "cannot be imported"))
    assert cli.main(["hello", "world"]) == 0
    assert "hello world" in capsys.readouterr().out
    assert cli.main(["validate", str(write(tmp_path, BASE))]) == 0   # the broken one: unaffected


def test_gpu_paths_follow_the_file(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    text = BASE.replace("    train: {lambda1: 0, lambda2: 0}", "    train: {use_gpu: true}")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text.replace("name: gradcam", "name: nope")))
    assert [w for w, _ in err.value.problems] == ["methods[0].name", "methods[3].train.use_gpu"]
