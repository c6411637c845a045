"""Where the bundled fixture lives (made by tests/fixtures/make_fixture.py)."""
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_MODEL_DIR = FIXTURES / "fmnist_vit"
FIXTURE_DATASET = FIXTURES / "fmnist16"
FIXTURE_MODEL = f"local-dir:{FIXTURE_MODEL_DIR}"
FIXTURE_VAL_LIMIT = 500


def small_dataset(root: Path) -> Path:
    """Two classes of the fixture dataset, four images each, in root/train/ and root/val/."""
    for split in ("train", "val"):
        for class_dir in sorted((FIXTURE_DATASET / split).iterdir())[:2]:
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:4]:
                shutil.copy(image, target / image.name)
    return root
