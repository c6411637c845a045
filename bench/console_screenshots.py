"""The pictures of the web console in docs/: its job list and a job's page, from a real service.

    .venv/bin/python bench/console_screenshots.py    # writes docs/console-jobs.png and docs/console-job.png

Starts `erq api` and `erq worker` in a scratch folder (no data roots: everything is uploaded), uploads
the bundled dataset and model, runs three short jobs on them, and photographs the console in
headless Chromium (Debian's chromium and chromium-driver).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erq_client import ErqClient  # noqa: E402
from tests.browser import chromium  # noqa: E402
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR, FIXTURE_VAL_LIMIT  # noqa: E402
from tests.service.processes import erq_process, free_port, wait_for_http  # noqa: E402
from tests.upload_archives import zip_folder  # noqa: E402

ERQ = str(Path(sys.executable).parent / "erq")
JOBS = [{"w_bits": 4, "a_bits": 4, "method": "erq"}, {"w_bits": 4, "a_bits": 4, "method": "rtn"},
        {"w_bits": 6, "a_bits": 6, "method": "erq"}]
WIDTH = 1100


def wait_for(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise SystemExit("the console did not show what was expected in time")


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="erq-console-"))
    (scratch / "no-data").mkdir()
    env = {**os.environ, "ERQ_HOME": str(scratch / "var"), "ERQ_DATA_ROOTS": str(scratch / "no-data"),
           "OMP_NUM_THREADS": "1"}
    key = subprocess.run([ERQ, "admin", "create-key", "demo"], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with erq_process(["worker"], env, scratch, scratch / "worker.log"), \
            erq_process(["api", "--port", str(port)], env, scratch, scratch / "api.log") as api:
        wait_for_http(f"{base}/healthz", api, scratch / "api.log")
        with ErqClient(base, key) as client:
            dataset = client.upload_dataset(zip_folder(FIXTURE_DATASET, scratch / "fmnist16.zip", inside="fmnist16"))
            model = client.upload_model(FIXTURE_MODEL_DIR)
            ids = [client.submit({"model": model["spec"], "dataset": dataset["spec"], "calib_size": 32,
                                  "val_limit": FIXTURE_VAL_LIMIT, **job}, metadata={"fixture": "fmnist16"})["id"]
                   for job in JOBS]
            for job_id in ids:
                client.wait(job_id)
        with chromium(scratch) as driver:
            driver.set_window_size(WIDTH, 800)
            driver.get(f"{base}/ui/")
            driver.find_element("id", "api-key").send_keys(key + "\n")
            wait_for(lambda: len(driver.find_elements("css selector", "table.jobs tbody tr")) == len(ids), 30)
            driver.save_screenshot(str(ROOT / "docs" / "console-jobs.png"))
            driver.get(f"{base}/ui/#/jobs/{ids[0]}")
            wait_for(lambda: driver.find_elements("id", "report"), 120)
            time.sleep(1)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(WIDTH, min(height + 120, 2600))
            driver.save_screenshot(str(ROOT / "docs" / "console-job.png"))
    print(ROOT / "docs" / "console-jobs.png", ROOT / "docs" / "console-job.png")


if __name__ == "__main__":
    main()
