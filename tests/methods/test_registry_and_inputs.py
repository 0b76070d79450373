"""The generic registry and every clear error for bad input (names, parameters, tensors)."""
from __future__ import annotations

import pytest
import torch

import backbones
import methods
from backbones import WeightsError
from backbones.registry import Registry, UnknownNameError, did_you_mean
from methods import ExplainerInputError

METHODS = methods.names()


# --- the generic registry -----------------------------------------------------------------
def test_registry_register_get_names_and_metadata():
    reg = Registry("widget")

    @reg.register(family="a", version=2)
    def alpha():
        return "A"

    @reg.register("beta-2", family="b")
    def something():
        return "B"

    assert reg.names() == ["alpha", "beta-2"] and len(reg) == 2
    assert "alpha" in reg and "gamma" not in reg
    assert reg.get("alpha").factory() == "A" and reg.get("alpha").meta == {"family": "a",
                                                                           "version": 2}
    assert reg.get("beta-2").name == "beta-2"
    assert [e.name for e in reg] == ["alpha", "beta-2"]


def test_registry_refuses_duplicates_and_unsafe_keys():
    reg = Registry("widget")
    reg.register("alpha")(lambda: 1)
    with pytest.raises(ValueError, match="duplicate widget name 'alpha'"):
        reg.register("alpha")(lambda: 2)
    with pytest.raises(ValueError, match="not MLflow-safe"):
        reg.register("bad name!")(lambda: 3)


def test_unknown_name_error_lists_close_names_and_everything():
    reg = Registry("widget")
    for n in ("scorecam", "gradcam", "gradcampp"):
        reg.register(n)(lambda: None)
    with pytest.raises(UnknownNameError) as err:
        reg.get("score-cam")
    msg = str(err.value)
    assert msg.startswith("unknown widget 'score-cam'.")
    assert "Did you mean 'scorecam'?" in msg
    assert msg.endswith("Available: gradcam, gradcampp, scorecam")
    # usable as KeyError and ValueError, message not quoted by KeyError
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert not str(err.value).startswith('"')
    # nothing close: no suggestion, still the list
    with pytest.raises(UnknownNameError) as err:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(err.value) and "Available: gradcam" in str(err.value)
    with pytest.raises(UnknownNameError):
        reg.get(["not", "hashable"])


def test_did_you_mean_normalises_case_dashes_underscores():
    assert did_you_mean("Grad-CAM", ["gradcam", "rise"]) == " Did you mean 'gradcam'?"
    assert did_you_mean("lcam-img", ["lcam_img", "lcam_fm"]) == " Did you mean 'lcam_img'?"
    assert did_you_mean("gradcamp", ["gradcam", "gradcampp"]).count("'") == 4   # two close
    assert did_you_mean("xyz", ["gradcam"]) == ""


# --- the two registries ---------------------------------------------------------------------
def test_registered_names_and_metadata():
    assert {"gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img"} <= set(METHODS)
    assert {"vgg16", "vgg16_7x7", "resnet50"} <= set(backbones.names())
    for entry in methods.REGISTRY:
        cls = entry.factory
        assert entry.meta["family"] in ("gradient", "perturbation", "learned"), entry.name
        assert entry.meta.get("display_name") and entry.meta.get("paper"), entry.name
        assert cls.name == entry.name and cls.family == entry.meta["family"]
        assert cls.variants and cls.variants[0] == "paper", entry.name
        assert isinstance(cls.version, int) and cls.version >= 1
    for entry in backbones.REGISTRY:
        assert entry.meta.get("feature_layer") and entry.meta.get("paper"), entry.name


def test_unknown_method_and_backbone_names(tiny_backbone):
    with pytest.raises(UnknownNameError) as err:
        methods.create("grad-cam", tiny_backbone)
    msg = str(err.value)
    assert "unknown method 'grad-cam'" in msg and "Did you mean 'gradcam'?" in msg
    assert all(n in msg for n in METHODS)
    with pytest.raises(UnknownNameError) as err:
        methods.create("scoreCAM", tiny_backbone)
    assert "Did you mean 'scorecam'?" in str(err.value)
    with pytest.raises(UnknownNameError) as err:
        backbones.load("resnet-50", weights=None)
    msg = str(err.value)
    assert "unknown backbone 'resnet-50'" in msg and "Did you mean 'resnet50'?" in msg
    assert all(n in msg for n in backbones.names())
    with pytest.raises(KeyError):                         # also a KeyError for dict-like use
        backbones.load("vgg21", weights=None)


# --- method parameters ----------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_unknown_parameter_is_named_with_the_accepted_list(name, tiny_backbone):
    cls = methods.method_class(name)
    with pytest.raises(ExplainerInputError) as err:
        methods.create(name, tiny_backbone, bogus_param=3)
    msg = str(err.value)
    assert f"{name}: unknown parameter(s) 'bogus_param'" in msg
    assert "Accepted:" in msg and "variant" in msg
    assert all(p in msg for p in cls.params)


def test_misspelt_parameter_gets_a_suggestion(tiny_backbone):
    with pytest.raises(ExplainerInputError) as err:
        methods.create("rise", tiny_backbone, n_mask=10)
    assert "'n_mask' Did you mean 'n_masks'?" in str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_variant_is_refused(name, tiny_backbone):
    with pytest.raises(ExplainerInputError) as err:
        methods.create(name, tiny_backbone, variant="authors")
    msg = str(err.value)
    assert msg.startswith("variant: 'authors'") and "Available: paper" in msg


@pytest.mark.parametrize("name, params, words", [
    ("rise", {"n_masks": 10.5}, ["n_masks", "int"]),
    ("rise", {"n_masks": "100"}, ["n_masks"]),
    ("rise", {"batch_size": True}, ["batch_size"]),
    ("rise", {"batch_size": None}, ["batch_size"]),
    ("rise", {"n_masks": 0}, ["n_masks must be >= 1"]),
    ("rise", {"p1": 1.5}, ["p1"]),
    ("rise", {"p1": "0.5"}, ["p1", "int or float"]),
    ("rise", {"fill": "grey"}, ["fill", "'grey'"]),
    ("scorecam", {"batch_size": 0}, ["batch_size"]),
    ("scorecam", {"batch_size": None}, ["batch_size"]),
    ("lcam_img", {"checkpoint": 3}, ["checkpoint"]),
])
def test_bad_parameter_values_name_the_parameter(name, params, words, tiny_backbone):
    with pytest.raises(ValueError) as err:
        methods.create(name, tiny_backbone, **params)
    assert all(w in str(err.value) for w in words), str(err.value)


# --- explain() inputs -----------------------------------------------------------------------
@pytest.fixture(params=METHODS)
def explainer(request, tiny_backbone):
    torch.manual_seed(0)
    extra = {"n_masks": 8} if request.param == "rise" else {}
    return methods.create(request.param, tiny_backbone, **extra)


def _err(explainer, images, targets=None) -> str:
    with pytest.raises(ExplainerInputError) as err:
        explainer.explain(images, targets)
    return str(err.value)


def test_targets_of_the_wrong_length_or_type(explainer):
    x = torch.rand(3, 3, 16, 16)
    msg = _err(explainer, x, torch.tensor([0, 1]))
    assert msg.startswith("targets:") and "expected 3 class indices" in msg and "(2,)" in msg
    assert _err(explainer, x, [0, 1, 2, 3]).startswith("targets: expected 3")
    assert _err(explainer, x, 2).startswith("targets: expected 3")          # one int, 3 images
    assert _err(explainer, x, torch.zeros(3, 1, dtype=torch.long)).startswith("targets:")
    assert "integer" in _err(explainer, x, torch.tensor([0.0, 1.0, 2.0]))
    assert "in [0, 4]" in _err(explainer, x, [0, 1, 5])
    assert "in [0, 4]" in _err(explainer, x, [0, -1, 2])


def test_images_outside_0_1_or_of_the_wrong_shape(explainer, tiny_backbone):
    x = torch.rand(2, 3, 16, 16)
    normalised = tiny_backbone.normalize(x)
    msg = _err(explainer, normalised)
    assert msg.startswith("images:") and "[0, 1]" in msg and "normalised" in msg
    assert _err(explainer, x * 255).startswith("images: values must be")
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert _err(explainer, nan).startswith("images: values must be finite")
    assert "(B, 3, H, W)" in _err(explainer, x[0])                        # no batch dim
    assert "(2, 1, 16, 16)" in _err(explainer, x[:, :1])                   # grey
    assert "(2, 16, 16, 3)" in _err(explainer, x.permute(0, 2, 3, 1))      # channels last
    assert "float" in _err(explainer, (x * 255).to(torch.uint8))
    assert "torch.Tensor" in _err(explainer, x.numpy())


# --- backbone weights -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_default_weights_are_refused(name):
    with pytest.raises(WeightsError) as err:
        backbones.load(name, weights="DEFAULT")
    msg = str(err.value)
    assert msg.startswith("weights: 'DEFAULT' is refused") and "IMAGENET1K_V1" in msg


def test_unknown_weights_name_and_missing_file(tmp_path):
    with pytest.raises(WeightsError) as err:
        backbones.load("resnet50", weights="imagenet1k_v1")
    msg = str(err.value)
    assert "weights: unknown ResNet50_Weights 'imagenet1k_v1'" in msg
    assert "Did you mean 'IMAGENET1K_V1'?" in msg and "IMAGENET1K_V2" in msg
    with pytest.raises(WeightsError, match=r"weights: file .*nope\.pth.* does not exist"):
        backbones.load("resnet50", weights=str(tmp_path / "nope.pth"))


def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError) as err:
        backbones.load("resnet50", weights=str(path))
    assert "weights:" in str(err.value) and "holds no resnet50 parameters" in str(err.value)


def test_unknown_backbone_argument_is_named():
    with pytest.raises(TypeError, match="bogus"):
        backbones.load("resnet50", weights=None, bogus=1)
