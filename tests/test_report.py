"""report.html as a browser shows it: headless Chromium loads the page the fixture run wrote, and
the chart and figures it renders are checked against metrics.json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from erq_core.report import layer_series, render_report


pytestmark = pytest.mark.integration  # headless Chromium

def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


def browser(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", f"--user-data-dir={profile}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Page(HTMLParser):
    """What the rendered DOM holds: layer groups with their bars, accuracy cells, stages, links."""

    def __init__(self):
        super().__init__()
        self.layers: list[dict] = []
        self.metrics: dict[str, dict] = {}
        self.stages: list[str] = []
        self.external: list[str] = []
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "g" and "layer" in classes:
            self.layers.append({"name": a["data-layer"], "bars": {}})
        if tag == "rect" and "bar" in classes:
            self.layers[-1]["bars"][a["data-series"]] = float(a["data-value"])
        if tag == "g" and "stage" in classes:
            self.stages.append(a["data-stage"])
        if "data-metric" in a:
            self._cell = a["data-metric"]
            self.metrics[self._cell] = {"value": json.loads(a["data-value"]), "text": ""}
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag in ("script", "link", "img", "iframe"):
            self.external.append(tag)

    def handle_data(self, data):
        if self._cell:
            self.metrics[self._cell]["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "span"):
            self._cell = None


def rendered(path: Path) -> Page:
    page = Page()
    page.feed(browser("--dump-dom", path.as_uri()).stdout)
    return page


def test_the_report_in_chromium_has_a_bar_group_per_layer_and_the_accuracy_of_metrics_json(erq_w4a4_run, tmp_path):
    folder, metrics = erq_w4a4_run
    page = rendered(folder / "report.html")
    assert [layer["name"] for layer in page.layers] == [layer["name"] for layer in metrics["layers"]]
    for shown, recorded in zip(page.layers, metrics["layers"]):
        assert shown["bars"] == {k: v for k, v in recorded.items() if k != "name" and v is not None}
    assert {"rtn", "aqer", "wqer"} <= set(page.layers[1]["bars"])  # a linear layer: all three steps
    for group in ("fp", "quantized"):
        for key in ("top1", "top5"):
            cell = page.metrics[f"{group}.{key}"]
            assert cell["value"] == metrics[group][key]
            assert cell["text"] == f"{metrics[group][key]:.2f}"
    assert page.stages == [k for k in metrics["seconds"] if k != "total"]
    assert page.external == []  # self-contained: nothing to fetch
    screenshot = tmp_path / "report.png"
    browser(f"--screenshot={screenshot}", "--window-size=1200,1800", (folder / "report.html").as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_extra_steps_become_extra_series_and_user_strings_are_escaped(tmp_path):
    layers = [{"name": "blocks.0.attn.qkv", "rtn": 0.02, "aqer": 0.015, "wqer": 0.01, "erq+ reconstruct": 0.005},
              {"name": "head", "rtn": 0.03, "aqer": None, "wqer": 0.02, "erq+ reconstruct": 0.01}]
    metrics = {"fp": {"top1": 80.0, "top5": 95.0}, "quantized": {"top1": 79.5, "top5": 94.9}, "n_val": 10,
               "seconds": {"load_model": 1.0, "total": 1.0}, "peak_memory_bytes": 2**30, "device": "cpu",
               "layers": layers}
    config = {"quantization": {"method": "erq+", "w_bits": 4, "a_bits": 4},
              "erq_config": {"model": "<script>alert(1)</script>"}}
    html = render_report(metrics, config)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert layer_series(layers) == ["rtn", "aqer", "wqer", "erq+ reconstruct"]
    (tmp_path / "report.html").write_text(html)
    page = rendered(tmp_path / "report.html")
    assert [sorted(layer["bars"]) for layer in page.layers] == [
        sorted(["rtn", "aqer", "wqer", "erq+ reconstruct"]), sorted(["rtn", "wqer", "erq+ reconstruct"])]
