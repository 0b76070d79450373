"""A file changed under the same name recomputes exactly the cells it affects (issue 22).

Two backbones with weights files of their own (3-class tiny architectures, random init) on a
generated 3-class folder; one method. Rewriting one backbone's weights file in place gives
that backbone's cell a new shard folder and leaves the other's shard files untouched (not
rewritten); rewriting one evaluation image in place recomputes both cells (both evaluate it).
Before the fix the weights were named by their file name: the stale shards were reused.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from services import REPO, short_tmp

pytestmark = pytest.mark.slow


def _shapes3():
    spec = importlib.util.spec_from_file_location(
        "shapes3", REPO / "examples" / "own-dataset" / "shapes3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from harness.pipeline import ray_runtime
    ray_runtime.prepare_environment(None)
    from backbones.embedded import ARCHS
    work = tmp_path_factory.mktemp("identity")
    root = _shapes3().make(work / "shapes3", train_per_class=2, val_per_class=2)
    weights = {}
    for i, name in enumerate(("tiny_vgg", "tiny_resnet")):
        torch.manual_seed(i)
        weights[name] = work / f"{name}.pt"
        torch.save(ARCHS[name](num_classes=3).state_dict(), weights[name])
    spec = work / "spec.yaml"
    spec.write_text(
        "schema: 1\nname: identity\n"
        f"backbones: [{{name: tiny_vgg, weights: {weights['tiny_vgg']}}}, "
        f"{{name: tiny_resnet, weights: {weights['tiny_resnet']}}}]\n"
        f"data: {{kind: folder, root: {root}}}\nmethods: [{{name: gradcam}}]\n"
        "evaluation: {batch_size: 3, overlays: 0}\nsharding: {images_per_task: 3}\n"
        f"storage: {{uri: {work / 'store'}}}\nray: {{num_cpus: 2}}\n"
        f"tracking: {{uri: 'sqlite:///{work}/mlflow.db'}}\n")
    yield {"work": work, "root": root, "weights": weights, "spec": spec}
    import ray
    ray.shutdown()


def _run(project, monkeypatch) -> dict[str, dict[Path, int]]:
    """Run the spec; per backbone, every shard file with its modification time."""
    from harness.pipeline.runner import run_benchmark
    from harness.spec import load_spec
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(project["work"] / "cache"))
    monkeypatch.setenv("RAY_TMPDIR", short_tmp("ri"))
    run_benchmark(load_spec(str(project["spec"])))
    store = project["work"] / "store" / "shards"
    return {b: {p: p.stat().st_mtime_ns for p in (store / b).glob("*/shard-*.parquet")}
            for b in ("tiny_vgg", "tiny_resnet")}


def _rewrite_weights(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, path)


def test_a_changed_file_recomputes_exactly_the_cells_it_affects(project, monkeypatch):
    first = _run(project, monkeypatch)
    assert all(len(files) == 2 for files in first.values())      # 6 images: 2 shards each
    _rewrite_weights(project["weights"]["tiny_vgg"])             # same path, new content
    second = _run(project, monkeypatch)
    assert second["tiny_resnet"] == first["tiny_resnet"]         # reused, not rewritten
    new_vgg = set(second["tiny_vgg"]) - set(first["tiny_vgg"])
    assert len(new_vgg) == 2 and {p.parent for p in new_vgg}.isdisjoint(
        {p.parent for p in first["tiny_vgg"]})                  # another folder: recomputed
    image = project["root"] / "val" / "sun" / "sun_0001.png"    # an evaluated image, in place
    from PIL import Image
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image)
    third = _run(project, monkeypatch)
    for name in ("tiny_vgg", "tiny_resnet"):
        assert len(set(third[name]) - set(second[name])) == 2, name
