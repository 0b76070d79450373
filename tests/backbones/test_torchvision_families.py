"""Every torchvision classification CNN as a backbone (``backbones.torchvision_models``).

- One model per family (``REPRESENTATIVES``: random init, one small image, built once per
  module): the split is exact (``bb(x)`` is bit for bit the torchvision model's output on the
  normalised image), the backbone passes the conformance kit (``harness.testing``), Grad-CAM
  passes the method kit on it and agrees with pytorch-grad-cam on A's layer (Pearson r >=
  0.99).
- Every registered backbone: its metadata (A's layer and shape at the input size, first
  layer) against the model built on the meta device (no memory, no init: milliseconds).
- Weights names are validated as for the paper's entries (``DEFAULT`` refused); images are
  prepared by the weights' own transforms (resize, crop, interpolation, mean/std); the
  paper's entries keep their rule; ViT, Swin and MaxViT are refused with their reason.
- ``-m full``: the backbone kit on every registered backbone (minutes: 71 models).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import models

import backbones
import methods
from backbones import torchvision_models as tvm
from backbones.registry import UnusableNameError, WeightsError
from harness.testing import check_backbone, check_explainer, sample_images

# One builder per family, and the image size used for it (A of 2 x 2 to 4 x 4).
REPRESENTATIVES = {
    "vgg11_bn": 64, "alexnet": 64, "resnet18": 96, "resnext50_32x4d": 64,
    "wide_resnet50_2": 64, "densenet121": 96, "mobilenet_v2": 96, "mobilenet_v3_small": 96,
    "efficientnet_b0": 96, "efficientnet_v2_s": 96, "convnext_tiny": 96,
    "regnet_y_400mf": 96, "shufflenet_v2_x0_5": 96, "mnasnet0_5": 96, "squeezenet1_1": 64,
    "googlenet": 96, "inception_v3": 139}
FAMILY_OF = {b: f for f in tvm.FAMILIES for b in f.members}

_BUILT: dict[str, backbones.SplitBackbone] = {}


def built(name: str) -> backbones.SplitBackbone:
    if name not in _BUILT:
        _BUILT[name] = backbones.load(name, weights=None, seed=0)
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _BUILT.clear()


def test_every_family_has_a_representative():
    assert {FAMILY_OF[b].name for b in REPRESENTATIVES} == {f.name for f in tvm.FAMILIES}
    assert len({f.name for f in tvm.FAMILIES}) >= 8


# -- one model per family ------------------------------------------------------------------------
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_split_equals_the_torchvision_model_exactly(name):
    bb = built(name)
    model, _ = tvm.torchvision_model(name, weights=None, seed=0)   # the same init, unsplit
    model.eval()
    x = sample_images(2, REPRESENTATIVES[name], REPRESENTATIVES[name], seed=1)
    with torch.no_grad():
        assert torch.equal(bb(x), model(bb.normalize(x)))
        assert torch.equal(bb.head(bb.features(x)), model(bb.normalize(x)))


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_representative_passes_the_backbone_kit(name):
    # A's shape at the full input size: test_metadata_of_every_registered_backbone (cheaper)
    found = check_backbone(lambda weights=None: built(name), size=REPRESENTATIVES[name])
    assert found["feature_layer"] == backbones.REGISTRY.get(name).meta["feature_layer"]


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_gradcam_passes_the_method_kit_on_each_family(name):
    found = check_explainer("gradcam", backbone=built(name), size=REPRESENTATIVES[name])
    assert found["rows_per_image"] == 1


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_gradcam_agrees_with_pytorch_grad_cam(name, helpers):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    bb, size = built(name), REPRESENTATIVES[name]
    x = sample_images(1, size, size, seed=7)
    with torch.no_grad():
        target = int(bb(x).argmax(1))
    explainer = methods.create("gradcam", bb)
    ours = explainer.explain(x, [target]).numpy()
    assert not explainer.last_degenerate.any()
    with pgc.GradCAM(model=bb, target_layers=[bb.body[-1]]) as cam:   # A's layer
        theirs = cam(input_tensor=x.clone().requires_grad_(True),
                     targets=[ClassifierOutputTarget(target)])
    assert helpers.hooks(bb) == {}
    assert _pearson(ours[0], theirs[0]) >= 0.99


# -- every registered backbone --------------------------------------------------------------------
@contextlib.contextmanager
def meta_device():
    """Build models on the meta device; RegNet computes its widths with tensor ops at build
    time, which must stay on the CPU."""
    from torchvision.models.regnet import BlockParams
    original = BlockParams.__dict__["from_init_params"]

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with torch.device("meta"):
            yield
    finally:
        BlockParams.from_init_params = original


@pytest.mark.parametrize("name", backbones.names())
def test_metadata_of_every_registered_backbone(name):
    entry = backbones.REGISTRY.get(name)
    meta = entry.meta
    assert entry.origin == "built-in" and meta["paper"] and meta["feature_layer"]
    with meta_device():
        bb = backbones.load(name, weights=None)
        a = bb.features(torch.empty(1, 3, *meta["input_size"]))
    assert tuple(a.shape[1:]) == tuple(meta["feature_shape"]) and a.shape[1] == bb.feature_channels
    assert bb.feature_layer == meta["feature_layer"] and tuple(bb.input_size) == meta["input_size"]
    assert isinstance(bb.first_layer, nn.Conv2d) and bb.first_layer.in_channels == 3
    if "weights_enum" in meta:
        enum = getattr(models, meta["weights_enum"])
        assert meta.get("default_weights", "IMAGENET1K_V1") in enum.__members__
        assert backbones.preprocessing(name).crop == tuple(meta["input_size"])


@pytest.mark.full
@pytest.mark.parametrize("name", backbones.names())
def test_every_registered_backbone_passes_the_kit(name):
    size = 139 if name == "inception_v3" else 64
    check_backbone(name, size=size)


# -- weights and preprocessing ------------------------------------------------------------------
def test_weights_names_are_validated_as_for_the_paper_entries(tmp_path):
    from harness.spec import SpecError, load_spec
    spec = tmp_path / "s.yaml"
    spec.write_text("schema: 1\nmethods: [gradcam]\nbackbones:\n"
                    "  - {name: resnet101, weights: IMAGENET1K_V2}\n"
                    "  - {name: regnet_y_128gf}\n  - {name: resnet18, weights: DEFAULT}\n"
                    "  - {name: efficientnet_b0, weights: imagenet1k_v1}\n  - vit_b_16\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    found = dict(err.value.problems)
    assert set(found) == {"backbones[2].weights", "backbones[3].weights", "backbones[4].name"}
    assert "'DEFAULT' is refused" in found["backbones[2].weights"]
    assert "Did you mean 'IMAGENET1K_V1'?" in found["backbones[3].weights"]
    assert "Vision Transformer" in found["backbones[4].name"]
    with pytest.raises(WeightsError, match="'DEFAULT' is refused"):
        backbones.load("mobilenet_v2", weights="DEFAULT")
    assert backbones.REGISTRY.get("regnet_y_128gf").meta["default_weights"] == \
        "IMAGENET1K_SWAG_E2E_V1"                               # no V1: the first member


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "swin_v2_b", "maxvit_t"])
def test_transformers_are_refused_with_the_reason(name):
    with pytest.raises(UnusableNameError) as err:
        backbones.load(name, weights=None)
    assert f"backbone '{name}' is refused" in str(err.value)
    assert "attention" in str(err.value) or "patch tokens" in str(err.value)
    assert name in backbones.REGISTRY.refused() and name not in backbones.names()


def test_preprocessing_comes_from_the_weights_transforms():
    pre = backbones.preprocessing("efficientnet_b3")
    assert (pre.crop, pre.resize, pre.interpolation) == ((300, 300), 320, "bicubic")
    assert backbones.preprocessing("regnet_y_16gf", "IMAGENET1K_SWAG_E2E_V1").crop == (384, 384)
    assert backbones.preprocessing("resnet101", "IMAGENET1K_V2").resize == 232
    assert backbones.preprocessing("resnet101", None).resize == 256      # random: the default's
    # the paper's entries keep the data layer's rule (resize None: 256 at 224), whatever weights
    for name in ("vgg16", "vgg16_7x7", "resnet50", "tiny_vgg"):
        assert backbones.preprocessing(name, "IMAGENET1K_V2").resize is None
    bb = backbones.load("efficientnet_v2_l", weights=None)           # mean = std = 0.5
    assert bb.mean.flatten().tolist() == [0.5] * 3 and bb.input_size == (480, 480)


def test_the_data_layer_reproduces_the_weights_transforms():
    from harness.data.images import make_transform
    weights = models.EfficientNet_B3_Weights.IMAGENET1K_V1
    pre = backbones.preprocessing("efficientnet_b3", weights.name)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (410, 530, 3),
                                                              dtype=np.uint8))
    ours = make_transform(pre.crop, kind="imagenet", resize=pre.resize,
                          interpolation=pre.interpolation)(image)
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    assert torch.allclose((ours - mean) / std, weights.transforms()(image), atol=1e-5)


def test_the_plan_prepares_images_with_the_weights_transforms(tmp_path):
    from harness.pipeline.plan import plan
    from harness.spec import load_spec
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    spec = tmp_path / "s.yaml"
    spec.write_text("schema: 1\nmethods: [gradcam]\nbackbones: [efficientnet_b3, resnet50]\n"
                    f"data: {{kind: imagenet, root: {tmp_path / 'imagenet'}}}\n")
    images = plan(load_spec(spec)).images
    b3, r50 = images["efficientnet_b3"], images["resnet50"]
    assert (b3.input_size, b3.resize, b3.interpolation) == ((300, 300), 320, "bicubic")
    assert (r50.input_size, r50.resize, r50.interpolation) == ((224, 224), None, "bilinear")
    assert "resize" not in r50.identity() and b3.identity()["resize"] == 320   # cache names
    quick = tmp_path / "q.yaml"
    quick.write_text("schema: 1\nmethods: [gradcam]\nbackbones: [efficientnet_b3]\n")
    qs = plan(load_spec(quick)).images["efficientnet_b3"]
    assert (qs.input_size, qs.resize, qs.interpolation) == ((300, 300), None, "bilinear")


def test_googlenet_input_transform_equals_its_own_normalisation():
    """With their ImageNet weights GoogLeNet/Inception-v3 re-normalise (transform_input); the
    backbone instead normalises with mean = std = 0.5 (the same function of the pixels)."""
    model = models.googlenet(weights=None, transform_input=True, aux_logits=False,
                             init_weights=False).eval()
    body, tail = FAMILY_OF["googlenet"].split(model)
    bb = backbones.SplitBackbone(name="g", body=body, tail=tail, feature_layer="inception5b",
                                 feature_channels=1024, num_classes=1000, weights_id="x",
                                 mean=(0.5,) * 3, std=(0.5,) * 3)
    x = sample_images(1, 64, 64, seed=2)
    imagenet = (x - torch.tensor(tvm.IMAGENET_MEAN)[:, None, None]) / \
        torch.tensor(tvm.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        assert torch.allclose(bb(x), model(imagenet), atol=1e-4)
