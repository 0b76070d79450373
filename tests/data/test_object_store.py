"""Images in an object store (issue 22): ``data.root: s3://...`` read through pyarrow.fs, on an
S3 server (moto) on 127.0.0.1. The data set from the store equals the same folder read
locally: the same images, labels, classes, decoded pixels and training draws (a DataLoader
with two worker processes, each reading from the store); a missing split and a list file are
refused naming the store."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from services import REPO, S3, object_store, upload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "shapes3", REPO / "examples" / "own-dataset" / "shapes3.py")
    shapes3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes3)
    work = tmp_path_factory.mktemp("store")
    local = shapes3.make(work / "shapes3", train_per_class=4, val_per_class=3)
    with object_store(work) as endpoint, pytest.MonkeyPatch.context() as mp:
        for key, value in S3.items():
            mp.setenv(key, value)
        yield {"local": local, "uri": upload(endpoint, local, "data/shapes3")}


def test_the_store_gives_the_local_folder_s_data_set(stored):
    from harness.data.images import build_dataset
    here = build_dataset("folder", "val", 64, root=stored["local"], limit=5)
    there = build_dataset("folder", "val", 64, root=stored["uri"], limit=5)
    assert there.source is not None and there.name == "shapes3"
    assert (there.ids, there.labels, there.classes) == (here.ids, here.labels, here.classes)
    for i in range(len(here)):
        assert torch.equal(there[i][0], here[i][0])
    assert len(there.info["files"]) == 16                         # its listing's digest


def test_training_draws_from_the_store_equal_the_local_ones(stored):
    from torch.utils.data import DataLoader

    from harness.data.images import build_dataset
    from harness.pipeline.heads import loader_options
    from methods.lcam_train import seed_epoch

    def epoch(root):
        ds = build_dataset("folder", "train", 64, root=root, train=True)
        loader = DataLoader(ds, batch_size=4, shuffle=False,
                            **loader_options(torch.device("cpu"), 2))
        seed_epoch(0, 1)
        return torch.cat([batch[0] for batch in loader])

    assert torch.equal(epoch(stored["uri"]), epoch(stored["local"]))


def test_a_missing_split_and_a_list_file_are_refused_naming_the_store(stored):
    from harness.data.images import DataError, build_dataset
    missing = stored["uri"].replace("data/shapes3", "data/nothing")
    with pytest.raises(DataError, match=f"{missing.split('?')[0]}/val does not exist"):
        build_dataset("folder", "val", 64, root=missing)
    with pytest.raises(DataError, match="a list file selects images of a local folder"):
        build_dataset("folder", "val", 64, root=stored["uri"], list_file=REPO / "x.txt")
