"""The metric registry (harness.metrics.registry) and the metric contract (base.py).

Every built-in metric's declarations are usable, its names and columns distinct; the
directions and headers the tables, paired tests and reports read are answered for the
numbers they show; the planned metrics of an evaluation come in column order with their
settings. Plugins (entry points of ``lcam_bench.metrics``, class references) are checked by
``_adopt``: a fake distribution ``lcamfakemetrics 0.1`` (written to a temporary folder on
``sys.path``, as tests/plugins/test_plugin_registry.py does for methods and backbones) holds
one good metric and one for each way of being broken, each refused with a ``PluginError``
naming the distribution and the problem, at ``validate`` time too.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from backbones.plugins import PluginError
from harness.metrics import registry
from harness.metrics.base import (Batch, Metric, MetricSettings, Reported,
                                  declaration_problems)

BUILT_IN = {"ad_ic", "localisation", "deletion", "insertion", "road", "sanity"}


# -- the built-in metrics --------------------------------------------------------------------
def test_every_built_in_metric_declares_a_usable_contract():
    assert set(registry.names()) == BUILT_IN
    for name in registry.names():
        cls = registry.metric_class(name)
        assert declaration_problems(cls) == [], name
        assert cls.name == name
        assert registry.REGISTRY.get(name).origin == "built-in"
        assert registry.REGISTRY.get(name).meta == {"display_name": cls.display_name,
                                                    "paper": cls.paper}


def test_names_keys_and_columns_are_distinct():
    names = registry.names()
    assert len(names) == len(set(names))
    display = [registry.metric_class(n).display_name for n in names]
    assert len(display) == len(set(display))
    keys = [r.key for n in names for r in registry.metric_class(n).reported]
    assert len(keys) == len(set(keys))
    columns = [c for n in names for c in registry.metric_class(n)().columns()]
    assert len(columns) == len(set(columns))         # no two metrics write one column
    # and no reported key matches another metric's pattern (AD_{k} is not AD_IC's ...)
    for key in (k.replace("{k}", "15") for k in keys):
        owners = [n for n in names if any(r.match(key) for r in
                                          registry.metric_class(n).reported)]
        assert len(owners) == 1, (key, owners)


def test_names_come_in_built_in_module_order():
    assert registry.names() == ["ad_ic", "localisation", "deletion", "insertion", "road",
                                "sanity"]


@pytest.mark.parametrize("key, direction, header", [
    ("AD_15", "lower", "AD(15%)↓"),
    ("AD_100", "lower", "AD(100%)↓"),
    ("IC_100", "higher", "IC(100%)↑"),
    ("IC_50", "higher", "IC(50%)↑"),
    ("deletion_auc", "lower", "Del↓"),
    ("insertion_auc", "higher", "Ins↑"),
    ("road_morf", "lower", "ROAD-MoRF↓"),
    ("road_lerf", "higher", "ROAD-LeRF↑"),
    ("road_combined", "higher", "ROAD↑"),
    ("localisation_energy", "higher", "Energy(box)↑"),
    ("sanity_spearman_layer4", "lower", "Spearman(layer4)"),
    ("FW", "lower", "#FW"),
    ("FW_deletion", "lower", "FW_deletion"),
])
def test_direction_and_header_answer_for_reported_numbers(key, direction, header):
    assert registry.direction(key) == direction
    assert registry.lower_is_better(key) is (direction == "lower")
    assert registry.header(key) == header


def test_unknown_numbers_have_no_direction():
    assert registry.direction("accuracy") is None and registry.header("accuracy") == "accuracy"
    assert registry.reported_for("AD_") is None and registry.metric_for("nothing") is None
    assert registry.metric_for("AD_15").name == "ad_ic"
    assert registry.digits("deletion_auc") == 3 and registry.digits("AD_15") == 2


def test_table_columns_and_directions_text():
    assert registry.table_columns() == ["deletion_auc", "insertion_auc", "road_morf",
                                        "road_lerf"]
    assert registry.directions_text(["AD_15", "IC_15", "deletion_auc", "road_morf",
                                     "unknown"]) == \
        "AD, deletion, ROAD MoRF: lower is better; IC: higher is better."


def test_planned_metrics_in_column_order_with_their_settings():
    from harness.metrics.protocol import PAPER
    from harness.pipeline.plan import EvaluationPlan
    plan = EvaluationPlan(fractions=(1.0, 0.15), preset=PAPER, batch_size=4, overlays=0,
                          autocast=False, channels_last=False, images_per_task=10,
                          cpus_per_task=1.0, gpus_per_task=0.0, max_retries=0,
                          metrics=("ad_ic", "road", "deletion"),
                          metric_settings=(("road", {"percentages": [0.5]}),),
                          causal_steps=8)
    measures = registry.planned(plan)
    assert [m.name for m in measures] == ["ad_ic", "localisation", "road", "deletion"]
    assert measures[0].settings.fractions == (1.0, 0.15)
    assert measures[2].settings.percentages == (0.5,) and measures[2].forward_passes() == 2
    assert measures[3].settings.steps == 8 and measures[3].forward_passes() == 9
    identity = registry.identity(plan)
    assert identity["causal"] == {"metrics": ["deletion"], "steps": 8, "canvas": "rise",
                                  "batch": 64}
    assert identity["metrics"]["road"]["percentages"] == [0.5]


# -- the declarations check ------------------------------------------------------------------
class _Good(Metric):
    name, display_name, paper = "good_mean", "Mean", "tests"
    reported = (Reported("good_mean", "higher", "Mean↑", column="good_mean"),)

    def columns(self):
        return ("good_mean",)


def _variant(**attrs):
    return type("Variant", (_Good,), attrs)


@pytest.mark.parametrize("attrs, problem", [
    ({"reported": ()}, "reported: must be a non-empty tuple of Reported"),
    ({"reported": (("good_mean", "higher"),)}, "reported: must be a non-empty tuple of Reported"),
    ({"reported": (Reported("good_mean", "up", "Mean"),)},
     "reported good_mean: direction 'up' is not one of lower, higher"),
    ({"reported": (Reported("good_mean", "higher", " "),)}, "reported good_mean: no table header"),
    ({"reported": (Reported("good_mean", "higher", "M", column="other"),)},
     "reported good_mean: its column 'other' is not among columns() ('good_mean',)"),
    ({"name": "good-mean"}, "name: 'good-mean' must be set to a key of letters, digits and '_'"),
    ({"name": ""}, "name: '' must be set"),
    ({"paper": ""}, "paper: must be a non-empty string"),
    ({"version": 0}, "version: 0 must be an int >= 1"),
    ({"version": True}, "version: True must be an int >= 1"),
    ({"stage": "shard"}, "stage: 'shard' is not one of image, cell"),
    ({"Settings": dict}, "Settings: must be a subclass of harness.metrics.base.MetricSettings"),
    ({"columns": lambda self: ()}, "columns(): () must be distinct per-image column names"),
    ({"columns": lambda self: ("good_mean", "good_mean")}, "must be distinct per-image"),
    ({"forward_passes": lambda self, size=None: -1},
     "forward_passes: returned -1, expected an int >= 0"),
    ({"forward_passes": lambda self, size=None: 1.0}, "forward_passes: returned 1.0"),
])
def test_declaration_problems_name_each_problem(attrs, problem):
    assert declaration_problems(_Good) == []
    found = declaration_problems(_variant(**attrs))
    assert any(problem in p for p in found), found


def test_declaration_problems_refuse_non_metrics():
    for thing in (object, Metric, 3, "harness.metrics.road:ROAD"):
        assert declaration_problems(thing) == [
            f"{thing!r} is not a subclass of harness.metrics.base.Metric"]



def test_declaration_problems_refuse_bad_default_settings():
    from pydantic import Field

    class Refused(MetricSettings):
        alpha: int = Field(0, ge=1)

    class Accepted(MetricSettings):
        alpha: int = Field(1, ge=1)

    found = declaration_problems(_variant(Settings=Refused))
    assert len(found) == 1 and found[0].startswith("Settings: its defaults are refused: "
                                                   "ValidationError")
    assert declaration_problems(_variant(Settings=Accepted)) == []


# -- plugins ---------------------------------------------------------------------------------
PKG = "lcamfake_metrics_pkg"
DIST = "lcamfakemetrics 0.1"
PLUGIN = f'''
import torch
from pydantic import Field
from harness.metrics.base import Metric, MetricSettings, Reported


class MeanSettings(MetricSettings):
    scale: float = Field(1.0, gt=0, description="multiplies the mean")


class MapMean(Metric):
    """The mean of each map (a test metric)."""
    name, display_name, paper = "fake_map_mean", "Map mean", "tests"
    Settings = MeanSettings
    reported = (Reported("fake_map_mean", "lower", "Mean↓", column="fake_map_mean",
                         label="map mean"),)

    def columns(self):
        return ("fake_map_mean",)

    def score(self, batch):
        means = batch.saliency.flatten(1).mean(1) * self.settings.scale
        return {{"fake_map_mean": [float(v) for v in means]}}


class NoReported(MapMean):
    name = "fake_no_reported"
    reported = ()


class BadDirection(MapMean):
    name = "fake_bad_direction"
    reported = (Reported("fake_bad_direction", "up", "Bad", column="fake_map_mean"),)


class Always(MapMean):
    name = "fake_always"
    always = True


class CellStage(MapMean):
    name = "fake_cell"
    stage = "cell"


class BadDefaults(MapMean):
    name = "fake_bad_defaults"

    class Settings(MetricSettings):
        scale: float = Field(0.0, gt=0)


class NotAMetric:
    name = "fake_not_a_metric"
'''
ENTRY_POINTS = f"""
[lcam_bench.metrics]
fake_map_mean = {PKG}.metric:MapMean
fake_no_reported = {PKG}.metric:NoReported
fake_bad_direction = {PKG}.metric:BadDirection
fake_always = {PKG}.metric:Always
fake_cell = {PKG}.metric:CellStage
fake_bad_defaults = {PKG}.metric:BadDefaults
fake_not_a_metric = {PKG}.metric:NotAMetric
fake_misnamed = {PKG}.metric:MapMean
fake_broken_import = {PKG}.missing:Anything
fake_no_attribute = {PKG}.metric:Nowhere
"""
WHERE = f"(distribution '{DIST}', entry point lcam_bench.metrics"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "metric.py").write_text(textwrap.dedent(PLUGIN))
    (root / PKG / "missing.py").write_text("import lcamfake_missing_dependency\n")
    info = root / "lcamfakemetrics-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lcamfakemetrics\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (info / "top_level.txt").write_text(PKG + "\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_a_good_plugin_metric_is_adopted_and_scores(plugin_path):
    assert "fake_map_mean" in registry.REGISTRY.plugin_names()
    assert "fake_map_mean" not in registry.names()
    entry = registry.REGISTRY.get("fake_map_mean")
    assert entry.origin == f"{DIST} (entry point lcam_bench.metrics)"
    assert entry.meta == {"display_name": "Map mean", "paper": "tests"}
    metric = registry.create("fake_map_mean", {"scale": 2.0})
    maps = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    got = metric.score(Batch(None, torch.zeros(2, 3, 2, 2), maps, torch.tensor([0, 0])))
    assert got == {"fake_map_mean": [1.5, 1.0]}
    assert registry.direction("fake_map_mean") == "lower"
    assert registry.header("fake_map_mean") == "Mean↓"
    assert "fake_map_mean" in registry.table_columns()
    by_reference = registry.metric_class(f"{PKG}.metric:MapMean")
    assert by_reference is registry.metric_class("fake_map_mean")
    assert registry.REGISTRY.get(f"{PKG}.metric:MapMean").origin == f"{DIST} (class reference)"


@pytest.mark.parametrize("name, problem", [
    ("fake_no_reported", "reported: must be a non-empty tuple of Reported"),
    ("fake_bad_direction", "reported fake_bad_direction: direction 'up' is not one of lower, "
                           "higher. Fix the class's declarations and reinstall the plugin"),
    ("fake_always", "a plugin metric is a per-image metric (stage 'image') that a spec lists "
                    "in evaluation.metrics, not 'always' computed"),
    ("fake_cell", "a plugin metric is a per-image metric (stage 'image')"),
    ("fake_bad_defaults", "Settings: its defaults are refused: ValidationError"),
    ("fake_not_a_metric", "is not a subclass of harness.metrics.base.Metric"),
    ("fake_misnamed", "the entry point's name 'fake_misnamed' differs from the class's name "
                      "'fake_map_mean'; make them equal"),
    ("fake_broken_import", "cannot be imported: ModuleNotFoundError: No module named "
                           "'lcamfake_missing_dependency'"),
    ("fake_no_attribute", "has no attribute 'Nowhere'"),
])
def test_broken_plugin_metrics_are_refused_naming_the_problem(plugin_path, name, problem):
    with pytest.raises(PluginError) as err:
        registry.metric_class(name)
    message = str(err.value)
    assert message.startswith(f"plugin '{name}' {WHERE}"), message
    assert problem in message
    with pytest.raises(PluginError):                  # refused the same way the second time
        registry.create(name)


def test_broken_plugins_leave_the_directions_to_the_others(plugin_path):
    """``classes()`` skips unusable plugins: the numbers still get their directions."""
    names = [cls.name for cls in registry.classes()]
    assert names[:6] == registry.names() and "fake_map_mean" in names
    assert "fake_bad_direction" not in names and "fake_no_reported" not in names
    assert registry.direction("road_morf") == "lower"
    assert registry.direction("fake_bad_direction") is None


def test_a_class_reference_is_checked_like_an_entry_point(plugin_path):
    with pytest.raises(PluginError) as err:
        registry.metric_class(f"{PKG}.metric:BadDirection")
    assert str(err.value).startswith(f"class reference '{PKG}.metric:BadDirection' "
                                     f"(distribution '{DIST}')")
    assert "direction 'up' is not one of lower, higher" in str(err.value)
    with pytest.raises(PluginError, match="is not a class reference"):
        registry.metric_class("some/file.py:MapMean")


def test_a_spec_refuses_broken_plugin_metrics_at_their_entry(plugin_path, tmp_path):
    from harness.spec import SpecError, load_spec
    path = tmp_path / "spec.yaml"
    path.write_text("schema: 1\nbackbones: [tiny_vgg]\nmethods: [gradcam]\nevaluation:\n"
                    "  metrics: [ad_ic, fake_bad_direction, {name: fake_always},\n"
                    "            {name: fake_map_mean, scale: 0}]\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    found = dict(err.value.problems)
    assert set(found) == {"evaluation.metrics[1]", "evaluation.metrics[2].name",
                          "evaluation.metrics[3].scale"}
    assert found["evaluation.metrics[1]"].startswith("plugin 'fake_bad_direction' " + WHERE)
    assert "direction 'up'" in found["evaluation.metrics[1]"]
    assert "not 'always' computed" in found["evaluation.metrics[2].name"]
    path.write_text(path.read_text().replace(
        "fake_bad_direction, {name: fake_always},\n", "\n").replace("scale: 0", "scale: 3"))
    spec = load_spec(path)
    assert spec.evaluation.metric_names() == ["ad_ic", "fake_map_mean"]
