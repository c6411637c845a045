"""The `erq` command as a user runs it: a real process, exit codes, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the real erq command

ERQ = str(Path(sys.executable).parent / "erq")


def erq(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([ERQ, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model(tmp_path, fixture_dataset):
    result = erq("quantize", "--model", "resnet_nope", "--dataset", str(fixture_dataset), "--out", str(tmp_path))
    assert_one_line_error(result, "unknown model 'resnet_nope'")


@pytest.mark.parametrize("flag, value", [("--w-bits", "1"), ("--a-bits", "9"), ("--w_bit", "12")])
def test_bits_outside_2_to_8(tmp_path, fixture_dataset, flag, value):
    result = erq("quantize", "--model", "deit_small", "--dataset", str(fixture_dataset), flag, value,
                 "--out", str(tmp_path))
    assert_one_line_error(result, "from 2 to 8")


def test_missing_dataset_folders(tmp_path, fixture_model_spec):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    result = erq("quantize", "--model", fixture_model_spec, "--dataset", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "has no 'val' folder", str(tmp_path / "data"))
    result = erq("quantize", "--model", fixture_model_spec, "--dataset", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "nowhere")


def test_offline_without_weights_says_how_to_supply_them(tmp_path, fixture_dataset):
    result = erq("quantize", "--model", "deit_tiny", "--dataset", str(fixture_dataset), "--out", str(tmp_path),
                 "--quiet", "--no-eval")
    assert_one_line_error(result, "--checkpoint", "local-dir:")


def test_missing_required_flag_is_one_line():
    assert_one_line_error(erq("quantize", "--model", "deit_small"), "required")


def test_quantize_then_evaluate(tmp_path, fixture_model_spec, fixture_dataset):
    out = tmp_path / "run"
    result = erq("quantize", "--model", fixture_model_spec, "--dataset", str(fixture_dataset),
                 "--w_bit", "4", "--a_bit", "4", "--coe", "10000", "--calib-batchsize", "32",
                 "--val-limit", "200", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["quantized"] == metrics["quantized"] and metrics["n_val"] == 200
    assert {"quantized.safetensors", "config.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    evaluated = erq("evaluate", str(out), "--dataset", str(fixture_dataset), "--val-limit", "200")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["top1"] == metrics["quantized"]["top1"]
