"""The web console in a real browser: headless Chromium (Debian's chromium and chromium-driver,
through Selenium) drives `erq api` and a real `erq worker` whose ERQ_DATA_ROOTS hold nothing. A user
pastes a key, uploads the bundled dataset as a zip and the model's two files, submits a job from the
form generated from the job schema, watches it reach `succeeded` through the live view, reads the
report, downloads the checkpoint and deletes the job; a second owner's key sees none of it. The page
is checked for labels and for fitting 360 px."""
from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.browser import chromium
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, env_without_data_roots, make_key
from tests.service.processes import api_process, erq_process
from tests.upload_archives import zip_folder

pytestmark = pytest.mark.integration
def wait_until(condition, seconds: float, what: str, driver=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    page = driver.find_element("tag name", "main").text[-2000:] if driver is not None else ""
    raise AssertionError(f"{what} not within {seconds} s\n{page}")


def text_of(driver, selector: str) -> str:
    """The element's text now (read in the page: the console redraws elements as events arrive)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
                                 selector)


def unlabelled_controls(driver) -> list[str]:
    """Inputs, selects, textareas and buttons without an accessible name."""
    return driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => !e.hidden && e.offsetParent !== null)
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()
                        && !e.closest('fieldset legend'))
          .map(e => e.outerHTML.slice(0, 120));""")


def sign_in(driver, key: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = wait_until(lambda: driver.find_elements("id", "api-key"), 30, "the key form", driver)[0]
    assert driver.switch_to.active_element == field  # focused: a keyboard user types straight away
    field.send_keys(key, Keys.TAB)  # and tabs to the button, which Enter presses
    assert driver.switch_to.active_element.text == "Use this key"
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait_until(lambda: driver.find_elements("css selector", "form.filters"), 30, "the job list", driver)


@ON_SQLITE
def test_the_console_runs_a_job_from_an_uploaded_dataset_end_to_end(tmp_path, settings):
    env = env_without_data_roots(tmp_path, settings)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    dataset_zip = zip_folder(FIXTURE_DATASET, tmp_path / "fmnist16.zip", inside="fmnist16")
    alice, bob = make_key(settings, "alice"), make_key(settings, "bob")
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        base = f"http://127.0.0.1:{port}"
        with chromium(downloads) as driver:
            driver.get(f"{base}/")  # / leads to the console
            assert driver.current_url.startswith(f"{base}/ui/")
            sign_in(driver, alice)

            driver.find_element("link text", "New job").click()
            form = wait_until(lambda: driver.find_elements("id", "job-form"), 30, "the job form", driver)[0]
            names = {e.get_attribute("name") for e in form.find_elements("css selector", "[name]")}
            assert {"model", "dataset", "w_bits", "a_bits", "method", "calib_size", "val_limit", "export"} <= names
            assert unlabelled_controls(driver) == []
            driver.find_element("id", "upload-dataset").send_keys(str(dataset_zip))
            wait_until(lambda: "Uploaded: dataset:" in text_of(driver, "#upload-dataset-status"), 120,
                       "the dataset upload", driver)
            driver.find_element("id", "upload-model").send_keys(
                f"{FIXTURE_MODEL_DIR / 'config.json'}\n{FIXTURE_MODEL_DIR / 'model.safetensors'}")
            wait_until(lambda: "Uploaded: upload:" in text_of(driver, "#upload-model-status"), 120,
                       "the model upload", driver)
            assert driver.find_element("id", "field-dataset").get_attribute("value").startswith("dataset:")
            driver.find_element("id", "field-calib_size").send_keys("32")
            driver.find_element("id", "field-val_limit").send_keys("200")
            driver.find_element("css selector", "#job-form button[type=submit]").click()

            job_id = wait_until(lambda: "#/jobs/" in driver.current_url and driver.current_url.rsplit("/", 1)[1], 30,
                                "the job page", driver)
            wait_until(lambda: text_of(driver, "#job-status") == "succeeded", 600, "the job's success", driver)
            log = text_of(driver, "#job-log")
            assert "succeeded" in log and len(log.splitlines()) > 5  # the log arrived through the event stream
            assert float(driver.find_element("id", "job-progress").get_attribute("value")) == 1.0
            report = wait_until(lambda: driver.find_elements("id", "report"), 60, "the inline report", driver)[0]
            driver.switch_to.frame(report)
            assert "top-1" in driver.find_element("tag name", "body").text.lower()
            driver.switch_to.default_content()

            job = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {alice}"}).json()
            checkpoint = next(a for a in job["artifacts"] if a["name"] == "quantized.safetensors")
            driver.find_element("css selector", "[data-artifact='quantized.safetensors']").click()
            saved = downloads / "quantized.safetensors"
            wait_until(lambda: saved.is_file() and not list(downloads.glob("*.crdownload")), 60, "the download", driver)
            assert hashlib.sha256(saved.read_bytes()).hexdigest() == checkpoint["sha256"]

            driver.get(f"{base}/ui/#/jobs")
            rows = wait_until(lambda: driver.find_elements("css selector", "table.jobs tbody tr"), 30, "the list", driver)
            assert len(rows) == 1 and "succeeded" in rows[0].text and "W4/A4" in rows[0].text
            for status, shown in (("failed", 0), ("succeeded", 1)):  # the API's filters, from the form
                driver.get(f"{base}/ui/#/jobs")
                wait_until(lambda: driver.find_elements("css selector", "form.filters"), 30, "the filters", driver)
                driver.find_element("css selector", f"input[name=status][value={status}]").click()
                driver.find_element("css selector", "form.filters button[type=submit]").click()
                wait_until(lambda: f"status={status}" in driver.current_url and (
                    len(driver.find_elements("css selector", "table.jobs tbody tr")) == shown
                    if shown else "No jobs match" in text_of(driver, "main")), 30, f"the {status} filter", driver)

            # A second owner's key sees none of it.
            driver.find_element("id", "forget-key").click()
            sign_in(driver, bob)
            wait_until(lambda: "No jobs match" in text_of(driver, "main"), 30, "bob's empty list", driver)
            driver.get(f"{base}/ui/#/jobs/{job_id}")
            wait_until(lambda: "no job" in text_of(driver, "[role=alert]"), 30, "bob's 404", driver)
            driver.get(f"{base}/ui/#/uploads")
            wait_until(lambda: text_of(driver, "main").count("None yet.") == 2, 30, "bob's empty uploads", driver)

            # Alice deletes the job from its page.
            driver.find_element("id", "forget-key").click()
            sign_in(driver, alice)
            driver.get(f"{base}/ui/#/jobs/{job_id}")
            wait_until(lambda: text_of(driver, "#job-status") == "succeeded", 30, "the job page", driver)
            driver.find_element("id", "delete-job").click()
            driver.switch_to.alert.accept()
            wait_until(lambda: driver.find_elements("css selector", "form.filters"), 30, "the list after delete", driver)
            assert httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {alice}"}).status_code == 404

        with chromium(downloads) as phone:
            # A phone's viewport (a desktop window cannot be made this narrow).
            phone.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                  {"width": 360, "height": 800, "deviceScaleFactor": 2, "mobile": True})
            phone.get(f"{base}/ui/")
            sign_in(phone, alice)
            for view in ("#/jobs", "#/new", "#/uploads"):
                phone.get(f"{base}/ui/{view}")
                wait_until(lambda: phone.find_elements("css selector", "main h1"), 30, view, phone)
                time.sleep(0.5)
                width, viewport = phone.execute_script(
                    "return [document.documentElement.scrollWidth, window.innerWidth]")
                assert viewport == 360 and width <= 360, f"{view} is {width} px wide in a {viewport} px viewport"
