"""The engine reads only inside the roots it is given: links inside a dataset or a model folder that
lead elsewhere are refused where the file is opened, and the error never names where they lead."""
import os
import shutil

import pytest
import torch

from erq_core import CheckpointError, DatasetError, ModelLoadError
from erq_core.data import ImageFiles, check_dataset, list_split
from erq_core.models import load_checkpoint
from erq_core.paths import restricted_to
from tests.fixture_paths import FIXTURE_MODEL_DIR


@pytest.fixture
def root(tmp_path, fixture_dataset):
    """A data root holding a small dataset (two classes, four images each) and a copy of the fixture model."""
    root = tmp_path / "root"
    for split in ("train", "val"):
        for class_dir in sorted((fixture_dataset / split).iterdir())[:2]:
            target = root / "ds" / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:4]:
                shutil.copy(image, target / image.name)
    shutil.copytree(FIXTURE_MODEL_DIR, root / "model")
    return root


@pytest.fixture
def elsewhere(tmp_path):
    """A folder outside the root, like ERQ_HOME: what a job must neither read nor reveal."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "broker.sqlite").write_bytes(b"SQLite format 3\x00")
    (home / "secret.png").write_bytes(b"not for this job")
    return home


def assert_hides(error: pytest.ExceptionInfo, elsewhere) -> None:
    message = str(error.value)
    assert "outside the data roots" in message
    assert str(elsewhere) not in message and "broker.sqlite" not in message and "secret.png" not in message


def test_a_class_folder_linked_outside_the_roots_is_refused_without_naming_its_files(root, elsewhere):
    (root / "ds" / "train" / "x").symlink_to(elsewhere)
    with restricted_to([root]), pytest.raises(DatasetError) as refused:
        check_dataset(root / "ds")
    assert_hides(refused, elsewhere)
    assert str(root / "ds" / "train" / "x") in str(refused.value)


def test_a_split_linked_outside_the_roots_is_refused(root, elsewhere):
    shutil.rmtree(root / "ds" / "val")
    (root / "ds" / "val").symlink_to(elsewhere)
    with restricted_to([root]), pytest.raises(DatasetError) as refused:
        check_dataset(root / "ds")
    assert_hides(refused, elsewhere)


def test_an_image_linked_outside_the_roots_is_refused(root, elsewhere):
    (root / "ds" / "train" / sorted((root / "ds" / "train").iterdir())[0].name / "zz.png").symlink_to(
        elsewhere / "secret.png")
    with restricted_to([root]), pytest.raises(DatasetError) as refused:
        list_split(root / "ds", "train")
    assert_hides(refused, elsewhere)


def test_an_image_relinked_after_listing_is_refused_when_opened(root, elsewhere):
    with restricted_to([root]):
        _, samples = list_split(root / "ds", "train")
        images = ImageFiles(samples, lambda image: torch.zeros(1))
        assert images[0][1] == 0  # read before the swap
        path = samples[0][0]
        (root / "ds" / "moved.png").write_bytes(open(path, "rb").read())
        os.remove(path)
        os.symlink(elsewhere / "secret.png", path)
        with pytest.raises(DatasetError) as refused:
            images[0]
    assert_hides(refused, elsewhere)


def test_links_inside_the_roots_are_followed(root):
    (root / "ds2").mkdir()
    for split in ("train", "val"):
        (root / "ds2" / split).symlink_to(root / "ds" / split)
    with restricted_to([root]):
        check_dataset(root / "ds2")


def test_model_files_linked_outside_the_roots_are_refused(root, elsewhere, tmp_path):
    from erq_core import ErqConfig
    from erq_core.models import load_model

    outside_weights = tmp_path / "weights.safetensors"
    shutil.copy(root / "model" / "model.safetensors", outside_weights)
    with restricted_to([root]):
        load_model(ErqConfig(model=f"local-dir:{root / 'model'}", dataset=str(root / "ds")))  # inside: loads
        (root / "model" / "model.safetensors").unlink()
        (root / "model" / "model.safetensors").symlink_to(outside_weights)
        with pytest.raises(CheckpointError) as refused:
            load_model(ErqConfig(model=f"local-dir:{root / 'model'}", dataset=str(root / "ds")))
        assert str(outside_weights) not in str(refused.value)
        (root / "linked-model").symlink_to(elsewhere)
        with pytest.raises(ModelLoadError) as refused:
            load_model(ErqConfig(model=f"local-dir:{root / 'linked-model'}", dataset=str(root / "ds")))
        assert_hides(refused, elsewhere)
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(torch.nn.Linear(1, 1), outside_weights)
        assert "outside the data roots" in str(refused.value)
