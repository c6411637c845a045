"""Dataset problems are errors that name the path."""
import shutil

import pytest
import torch

from erq_core import DatasetError
from erq_core.data import calibration_loader, check_dataset, validation_loader
from tests.fixture_paths import small_dataset


@pytest.fixture
def dataset(tmp_path):
    return small_dataset(tmp_path / "data")


def to_tensor(image):
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype="float32")).permute(2, 0, 1)


def test_a_good_dataset_passes(dataset):
    check_dataset(dataset)
    images, labels = next(iter(calibration_loader(dataset, to_tensor, 8, 8, seed=0)))
    assert images.shape == (8, 3, 16, 16) and set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_is_named(dataset, split):
    shutil.rmtree(dataset / split)
    with pytest.raises(DatasetError, match=f"no '{split}' folder"):
        check_dataset(dataset)


def test_empty_class_folder_is_named(dataset):
    (dataset / "val" / "9_empty").mkdir()
    with pytest.raises(DatasetError, match="9_empty has no images"):
        check_dataset(dataset)


def test_non_image_file_is_named(dataset):
    stray = dataset / "train" / sorted(p.name for p in (dataset / "train").iterdir())[0] / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(DatasetError, match="notes.txt is not an image file"):
        check_dataset(dataset)


def test_corrupt_image_is_named_when_read(dataset):
    class_dir = sorted((dataset / "val").iterdir())[0]
    broken = class_dir / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    check_dataset(dataset)  # the name is fine; only reading finds the problem
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        for _ in validation_loader(dataset, to_tensor, 4):
            pass


def test_calibration_larger_than_train_is_refused(dataset):
    with pytest.raises(DatasetError, match="calib_size 100 is more than the 8 images"):
        calibration_loader(dataset, to_tensor, 100, 8, seed=0)


def test_val_limit_picks_a_fixed_mixed_subset(dataset):
    labels = [y for _, ys in validation_loader(dataset, to_tensor, 8, val_limit=4) for y in ys.tolist()]
    again = [y for _, ys in validation_loader(dataset, to_tensor, 8, val_limit=4) for y in ys.tolist()]
    assert len(labels) == 4 and labels == again
