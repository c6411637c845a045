"""Where the bundled fixture lives (made by tests/fixtures/make_fixture.py)."""
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_MODEL_DIR = FIXTURES / "fmnist_vit"
FIXTURE_DATASET = FIXTURES / "fmnist16"
FIXTURE_MODEL = f"local-dir:{FIXTURE_MODEL_DIR}"
FIXTURE_VAL_LIMIT = 500
