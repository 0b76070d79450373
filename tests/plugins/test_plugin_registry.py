"""Plugins through the registries: entry points, class references, origins, and every broken
plugin refused before anything starts (exit 2, the distribution named).

A fake distribution ``lcamfake 0.3`` is written to a temporary folder put on ``sys.path``
(``importlib.metadata`` reads its ``entry_points.txt`` from there, as from site-packages):
one good method, one good backbone, and one plugin for each way of being broken. The
command-line tests run ``python -m harness`` with that folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import backbones
import methods
from backbones.plugins import PluginError
from harness.spec import SpecError, load_spec
from harness.testing import check_backbone, check_explainer

REPO = Path(__file__).resolve().parents[2]
PKG = "lcamfake_pkg"
MODULES = {
    "good.py": '''
        import torch
        from methods.base import Explainer, Param

        class Good(Explainer):
            """Channel-mean CAM of the class-weighted maps (a test method)."""
            name, display_name, family, paper = "fake_good", "Fake", "gradient", "tests"
            params = {"power": Param(int, 1, "exponent of the map", ge=1)}

            def _saliency(self, images, feats, logits, targets):
                w = self.backbone.tail[-1].weight[targets][:, :, None, None]
                return torch.relu((w * feats).sum(1)) ** self.config["power"]
        ''',
    "broken_import.py": "import lcamfake_missing_dependency\n",
    "wrong_base.py": "class NotAnExplainer:\n    name = 'fake_wrong_base'\n",
    "bad_params.py": '''
        from methods.base import Explainer, Param

        class BadParams(Explainer):
            name, display_name, family, paper = "fake_bad_params", "Bad", "gradient", "tests"
            params = {"alpha": Param(int, 0, "must be >= 1 but defaults to 0", ge=1)}

            def _saliency(self, images, feats, logits, targets):
                return feats.sum(1)
        ''',
    "learned.py": '''
        from methods.base import Explainer

        class Learned(Explainer):
            name, display_name, family, paper = "fake_learned", "L", "learned", "tests"

            def _saliency(self, images, feats, logits, targets):
                return feats.sum(1)
        ''',
    "nets.py": '''
        from torch import nn
        from harness.testing import tiny_backbone

        def fake_net(weights=None, seed: int = 0):
            return tiny_backbone(seed=seed)

        fake_net.paper = "tests"

        def not_split(weights=None):
            return nn.Linear(3, 3)
        ''',
}
ENTRY_POINTS = f"""
[lcam_bench.methods]
fake_good = {PKG}.good:Good
fake_broken_import = {PKG}.broken_import:Anything
fake_wrong_base = {PKG}.wrong_base:NotAnExplainer
fake_bad_params = {PKG}.bad_params:BadParams
fake_learned = {PKG}.learned:Learned
fake_misnamed = {PKG}.good:Good
[lcam_bench.backbones]
fake_net = {PKG}.nets:fake_net
fake_not_split = {PKG}.nets:not_split
"""
DIST = "lcamfake 0.3"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    for name, text in MODULES.items():
        (root / PKG / name).write_text(textwrap.dedent(text))
    info = root / "lcamfake-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lcamfake\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (info / "top_level.txt").write_text(PKG + "\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def spec_problems(tmp_path: Path, body: str) -> dict[str, str]:
    path = tmp_path / "spec.yaml"
    path.write_text("schema: 1\n" + body)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    return dict(err.value.problems)


def test_entry_points_resolve_with_their_origin(plugin_path):
    assert "fake_good" in methods.REGISTRY.plugin_names()
    assert "fake_good" not in methods.names()           # names(): the built-in ones only
    entry = methods.REGISTRY.get("fake_good")
    assert entry.origin == f"{DIST} (entry point lcam_bench.methods)"
    assert methods.method_class("fake_good").__name__ == "Good"
    check_explainer("fake_good")                         # and it fulfils the contract
    net = backbones.REGISTRY.get("fake_net")
    assert net.origin == f"{DIST} (entry point lcam_bench.backbones)"
    assert net.meta["feature_shape"] == (6, 4, 4) and net.meta["input_size"] == (16, 16)
    assert net.meta["default_weights"] is None and net.meta["paper"] == "tests"
    check_backbone("fake_net")


def test_a_spec_names_plugins_and_class_references(plugin_path, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"schema: 1\nbackbones: [fake_net, '{PKG}.nets:fake_net']\nmethods:\n"
                    "  - fake_good\n"
                    f"  - {{name: '{PKG}.good:Good', id: by_reference, params: {{power: 2}}}}\n"
                    f"  - {{name: '{PKG}.good:Good', variant: paper}}\n")
    with pytest.raises(SpecError) as err:                # a reference's default id: its name
        load_spec(path)
    assert err.value.problems == [("methods[2].name", "duplicate method id 'fake_good' (also "
                                   "methods[0]); give each entry a distinct 'id'")]
    path.write_text(path.read_text().replace(", variant: paper", ", id: third"))
    spec = load_spec(path)
    assert [m.id for m in spec.methods] == ["fake_good", "by_reference", "third"]
    assert spec.methods[1].params == {"power": 2} and spec.methods[1].display_name == "Fake"
    ref = methods.REGISTRY.get(f"{PKG}.good:Good")
    assert ref.origin == f"{DIST} (class reference)"
    bb = backbones.load(f"{PKG}.nets:fake_net", weights=None)
    assert methods.create(f"{PKG}.good:Good", bb).explain(torch.rand(1, 3, 16, 16)).shape == \
        (1, 16, 16)


def test_broken_plugins_are_refused_naming_the_distribution(plugin_path, tmp_path):
    found = spec_problems(tmp_path, "backbones: [fake_net, fake_not_split]\nmethods:\n"
                          "  - fake_broken_import\n  - fake_wrong_base\n  - fake_bad_params\n"
                          "  - fake_learned\n  - fake_misnamed\n"
                          f"  - {PKG}.nowhere:Good\n  - 'some/file.py:Good'\n")
    plugin = f"(distribution '{DIST}', entry point lcam_bench"
    assert set(found) == {"backbones[1].name", *(f"methods[{i}].name" for i in range(7))}
    assert found["methods[0].name"].startswith(f"plugin 'fake_broken_import' {plugin}.methods")
    assert "cannot be imported: ModuleNotFoundError: No module named " \
           "'lcamfake_missing_dependency'" in found["methods[0].name"]
    assert "is not a subclass of methods.base.Explainer" in found["methods[1].name"]
    assert "params.alpha: its default 0 is refused by its own declaration" in \
        found["methods[2].name"] and plugin in found["methods[2].name"]
    assert "learned plugin methods are not supported" in found["methods[3].name"]
    assert "the entry point's name 'fake_misnamed' differs from the class's name 'fake_good'" \
        in found["methods[4].name"]
    assert found["methods[5].name"].startswith(f"class reference '{PKG}.nowhere:Good'")
    assert "has no attribute" not in found["methods[5].name"]       # the module is missing
    assert "is not a class reference" in found["methods[6].name"]   # no file paths
    assert "returned a Linear, not a backbones.base.SplitBackbone" in found["backbones[1].name"]
    with pytest.raises(PluginError, match="cannot be imported"):
        methods.create("fake_broken_import", None)


def test_unknown_names_list_the_installed_plugins(plugin_path):
    with pytest.raises(KeyError) as err:
        methods.REGISTRY.get("fake_goood")
    message = str(err.value)
    assert "Did you mean 'fake_good'?" in message and "; plugins: fake_bad_params" in message


def harness_cli(args: list[str], plugin_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_root), str(REPO)]),
           "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_validate_refuses_a_broken_plugin_with_exit_2(plugin_path, tmp_path):
    (tmp_path / "spec.yaml").write_text("schema: 1\nbackbones: [fake_net]\n"
                                        "methods: [fake_good, fake_bad_params]\n")
    res = harness_cli(["validate", "spec.yaml"], plugin_path, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "methods[1].name: plugin 'fake_bad_params' (distribution 'lcamfake 0.3'" in out
    assert "Traceback" not in out and "methods[0]" not in out


def test_ls_shows_origins_families_and_refusals(plugin_path, tmp_path):
    res = harness_cli(["ls"], plugin_path, tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert "built-in" in rows["gradcam"] and "built-in" in rows["resnet18"]
    assert "lcamfake 0.3" in rows["fake_good"]
    assert "lcamfake 0.3" in rows["fake_net"] and "6x4x4" in rows["fake_net"]
    assert "unusable" in rows["fake_wrong_base"]
    assert "layer4" in rows["resnet101"] and "inception5b" in rows["googlenet"]
    assert "refused (not CNNs" in res.stdout and "vit_b_16" in res.stdout


def test_the_spec_runtime_env_reaches_ray_init(monkeypatch):
    """ray.runtime_env (e.g. the plugins for a cluster's workers) is passed to ray.init,
    with the harness's own variables added to its env_vars. Ray is imported the way the
    harness imports it (after ``prepare_environment``'s variables), so that later in-process
    tests find it loopback-only."""
    from harness.pipeline import ray_runtime
    for key, value in {**ray_runtime.QUIET, **ray_runtime.LOOPBACK_ONLY}.items():
        monkeypatch.setenv(key, value)
    import ray
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_runtime.init_ray("ray://head:10001", None, {"HARNESS_CACHE_DIR": "/c"},
                         {"pip": ["lcam-xgradcam"], "env_vars": {"A": "1"}})
    assert calls[0]["runtime_env"] == {"pip": ["lcam-xgradcam"],
                                       "env_vars": {"A": "1", "HARNESS_CACHE_DIR": "/c"}}
