"""The README's picture of report.html: ERQ W4/A4 on the bundled fixture, rendered by headless Chromium.

    python bench/report_screenshot.py    # writes bench/results/report.png (and report.html beside it)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erq_core import ErqConfig, run  # noqa: E402
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL, FIXTURE_VAL_LIMIT  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> None:
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as profile:
        run(ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), w_bits=4, a_bits=4, calib_size=32,
                      val_limit=FIXTURE_VAL_LIMIT), out, device="cpu")
        shutil.copy(Path(out) / "report.html", RESULTS / "report.html")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        f"--screenshot={RESULTS / 'report.png'}", "--window-size=1100,1750",
                        (RESULTS / "report.html").as_uri()], check=True, capture_output=True, timeout=180)
    print(RESULTS / "report.png")


if __name__ == "__main__":
    main()
