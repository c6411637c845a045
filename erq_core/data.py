"""ImageFolder datasets: ROOT/train (calibration) and ROOT/val (evaluation).

The folder is checked before any work starts: a missing split, a class folder without images or
a stray non-image file is an error that names the path. Images are decoded lazily; one that
cannot be read fails with its path. Preprocessing comes from the model's pretrained_cfg.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from erq_core.errors import DatasetError
from erq_core.paths import inside_roots

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_SUBSET_SEED = 0  # a val_limit subset is the same for every run, so results compare


def list_split(root: str | Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (image path, class index) of ROOT/split, checked."""
    folder = _split_folder(root, split)
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(f"{folder} has no class folders (expected {folder}/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        class_folder = inside_roots(folder / name, "class folder", DatasetError)
        files = sorted(os.path.join(folder, name, e.name) for e in os.scandir(class_folder)
                       if e.is_file() and not e.name.startswith("."))
        if not files:
            raise DatasetError(f"class folder {folder / name} has no images")
        for path in files:
            inside_roots(path, "image", DatasetError)
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                raise DatasetError(f"{path} is not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)})")
            samples.append((path, index))
    return classes, samples


def _split_folder(root: str | Path, split: str) -> Path:
    folder = Path(root) / split
    inside_roots(root, "dataset", DatasetError)
    if not Path(root).is_dir():
        raise DatasetError(f"dataset {str(root)!r} is not a folder (expected an ImageFolder root with train/ and val/)")
    inside_roots(folder, f"the {split!r} folder", DatasetError)  # before looking: nothing said of what is outside
    if not folder.is_dir():
        raise DatasetError(f"dataset {str(root)!r} has no {split!r} folder (expected {folder}/<class>/<image>)")
    return folder


class ImageFiles(Dataset):
    """(image tensor, label) pairs; an unreadable image raises DatasetError naming the file."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        resolved = inside_roots(path, "image", DatasetError)  # checked again: a link may have changed since listing
        try:
            with Image.open(resolved) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from None
        return self.transform(image), label


def build_transform(pretrained_cfg: dict[str, Any]) -> Callable:
    """timm's evaluation transform: resize to size / crop_pct, center crop, normalize."""
    from timm.data import create_transform, resolve_data_config

    data_config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    return create_transform(**data_config, is_training=False)


def calibration_loader(root: str | Path, transform: Callable, calib_size: int, batch_size: int,
                       seed: int, num_workers: int = 0) -> DataLoader:
    """`calib_size` training images drawn with `seed`, in a fixed order (re-iterable)."""
    _, samples = list_split(root, "train")
    if calib_size > len(samples):
        raise DatasetError(f"calib_size {calib_size} is more than the {len(samples)} images in {Path(root) / 'train'}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(samples), generator=generator)[:calib_size].tolist()
    return DataLoader(ImageFiles([samples[i] for i in chosen], transform), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers)


def validation_loader(root: str | Path, transform: Callable, batch_size: int, val_limit: Optional[int] = None,
                      num_workers: int = 0) -> DataLoader:
    """The val split, or a fixed random subset of `val_limit` images of it."""
    _, samples = list_split(root, "val")
    dataset: Dataset = ImageFiles(samples, transform)
    if val_limit is not None and val_limit < len(samples):
        generator = torch.Generator().manual_seed(VAL_SUBSET_SEED)
        dataset = Subset(dataset, torch.randperm(len(samples), generator=generator)[:val_limit].tolist())
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def check_dataset(root: str | Path) -> None:
    """Both splits present and well formed (before any model is loaded)."""
    _split_folder(root, "train")
    _split_folder(root, "val")
    list_split(root, "train")
    list_split(root, "val")
