"""The production shape: docker-compose.yml validates and has what it must; the image runs as non-root."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates_with_the_required_services():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    subprocess.run([compose, "config", "-q"], cwd=ROOT, check=True)
    import yaml

    config = yaml.safe_load(subprocess.run([compose, "config"], cwd=ROOT, check=True, capture_output=True,
                                           text=True).stdout)
    assert {"api", "worker", "redis", "postgres"} <= set(config["services"])
    gpu = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert {"artifacts", "postgres"} <= set(config["volumes"])
    assert config["services"]["worker"]["environment"]["ERQ_BROKER_URL"].startswith("redis://")


def test_dockerfile_runs_as_a_non_root_user():
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [line[1] for line in lines if line[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
