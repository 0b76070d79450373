"""pytorch-grad-cam's methods as harness methods (``pgc:<Class>``, methods.ecosystem): each
passes the method contract (harness.testing), counts its forwards itself, explains the
harness's A, and is refused by name with the choices when it is not one."""
from __future__ import annotations

import pytest
import torch

import backbones
import methods
from backbones.plugins import PluginError
from harness.spec import SpecError, load_spec
from harness.testing import ConformanceError, check_explainer, sample_images, tiny_backbone
from methods.ecosystem import CLASS_AGNOSTIC, PGC_METHODS, pgc_method

pytest.importorskip("pytorch_grad_cam")


@pytest.mark.parametrize("name", sorted(PGC_METHODS))
def test_every_adapted_method_passes_the_method_contract(name):
    measured = check_explainer(f"pgc:{name}")
    k = 6                                         # tiny_backbone's channels
    want = {"one": 1, "channels": k, "channels+1": k + 1}[PGC_METHODS[name][1]]
    assert measured["forward_passes"] == want
    assert measured["rows_per_image"] == (1 if want == 1 else want + 1)   # + the clean pass


def test_the_id_display_name_and_family_come_from_the_library_class():
    cls = methods.method_class("pgc:LayerCAM")
    assert (cls.name, cls.display_name, cls.family) == ("pgc_layercam", "LayerCAM (pgc)",
                                                        "gradient")
    assert "Jiang et al." in cls.paper and "pytorch-grad-cam" in cls.paper
    from importlib.metadata import version
    assert cls.library == f"grad-cam {version('grad-cam')}"      # in its cells' identity
    from harness.pipeline.evaluation import _library_identity
    assert _library_identity("pgc:LayerCAM") == {"library": cls.library}
    assert _library_identity("gradcam") == {}                   # built-in cells unchanged
    assert methods.method_class("pgc:EigenCAM").class_agnostic is True
    assert methods.method_class("pgc:LayerCAM").class_agnostic is False


def test_pgc_gradcam_explains_the_same_a_as_the_built_in_grad_cam():
    """The same A, the same gradient through the head: the maps agree up to the library's
    resizing (OpenCV's bilinear against torch's): Pearson >= 0.99 per image."""
    bb = backbones.load("tiny_vgg", weights=None, seed=3)
    x = sample_images(4, 64, 64, seed=5)
    ours = methods.create("gradcam", bb).explain(x).flatten(1)
    theirs = methods.create("pgc:GradCAM", bb).explain(x).flatten(1)
    for a, b in zip(ours, theirs):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert r >= 0.99, r
    assert float((ours - theirs).abs().max()) < 0.1


def test_score_cam_counts_its_masked_forwards():
    bb = tiny_backbone()
    ex = methods.create("pgc:ScoreCAM", bb)
    ex.explain(sample_images(3, 16, 16, seed=1))
    assert ex.last_forward_passes == bb.feature_channels == ex.forward_passes


def test_a_class_agnostic_method_declared_class_aware_fails_the_kit():
    """The kit's targets check is what class_agnostic relaxes: Eigen-CAM's map is the same
    for every class, which the kit refuses of a method that says it depends on the class."""
    cls = type("EigenAware", (pgc_method("EigenCAM"),), {"class_agnostic": False})
    with pytest.raises(ConformanceError, match="the maps of classes .* are the same"):
        check_explainer(cls)
    assert "EigenCAM" in CLASS_AGNOSTIC


def test_an_unknown_library_method_is_refused_with_the_choices(tmp_path):
    with pytest.raises(PluginError, match=r"pgc:LayrCAM is not a pytorch-grad-cam method "
                                          r"the harness runs\. Did you mean 'LayerCAM'\?"):
        methods.method_class("pgc:LayrCAM")
    spec = tmp_path / "s.yaml"
    spec.write_text("schema: 1\nbackbones: [tiny_vgg]\nmethods: [gradcam, 'pgc:LayrCAM']\n")
    with pytest.raises(SpecError, match=r"methods\[1\]\.name: .*Did you mean 'LayerCAM'"):
        load_spec(spec)


def test_a_spec_plans_library_methods_with_their_ids_and_forwards(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("schema: 1\nbackbones: [tiny_vgg]\ndata: {kind: quickstart, limit: 4}\n"
                    "methods: [gradcam, 'pgc:LayerCAM', 'pgc:ScoreCAM']\n")
    loaded = load_spec(spec)
    assert [m.id for m in loaded.methods] == ["gradcam", "pgc_layercam", "pgc_scorecam"]
    from harness.pipeline.plan import plan as make_plan
    plan = make_plan(loaded)
    fw = {c.method_id: c.forward_passes for c in plan.cells}
    assert fw == {"gradcam": 1, "pgc_layercam": 1, "pgc_scorecam": 128}
