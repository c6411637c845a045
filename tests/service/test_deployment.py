"""The production shape: the Dockerfile's stages, docker-compose.yml, the installed package, and
an API that runs without torch. No Docker engine is needed (`docker-compose config` only parses)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # docker-compose, a wheel build and python processes

ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = {"erq_core", "storage", "service", "worker"}
# Pillow is not among them: the API decodes uploaded images with it (storage/archives.py).
ENGINE_PACKAGES = {"torch", "torchvision", "timm", "safetensors", "numpy"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def index(self, predicate) -> int:
        return next(i for i, (op, args) in enumerate(self.instructions) if predicate(op, args))


def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())  # join continued lines
    stages: dict[str, Stage] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            image, _, name = args.partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), image.strip())
        else:
            current.instructions.append((op.upper(), args))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built on, base first."""
    stage = stages[name]
    return (chain(stages, stage.base) if stage.base in stages else []) + [stage]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def package_name(requirement: str) -> str:
    return re.split(r"[\[=<>~ ]", requirement, maxsplit=1)[0].lower()


def test_every_base_image_is_pinned_to_a_full_version():
    for stage in dockerfile_stages().values():
        if stage.base not in dockerfile_stages():
            assert re.search(r":\d+\.\d+\.\d+[\w.-]*$|@sha256:[0-9a-f]{64}$", stage.base), stage.base


@pytest.mark.parametrize("target", ["api", "worker"])
def test_each_image_installs_dependencies_before_the_source_and_the_project_not_editable(target):
    stages = chain(dockerfile_stages(), target)
    instructions = [instruction for stage in stages for instruction in stage.instructions]
    deps = next(i for i, (op, args) in enumerate(instructions) if op == "RUN" and "pip install -r" in args)
    copies_source = [i for i, (op, args) in enumerate(instructions)
                     if op == "COPY" and SOURCE_FOLDERS & set(args.split())]
    assert copies_source and deps < min(copies_source), "a code change would reinstall the dependencies"
    project_installs = [args for op, args in instructions if op == "RUN" and re.search(r"pip install .*\s\.(\s|$)",
                                                                                        args)]
    assert project_installs and all("-e" not in args.split() and "--editable" not in args
                                    for args in project_installs)
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_the_api_image_installs_no_torch_and_the_worker_image_installs_the_engine(tmp_path):
    project = pyproject()
    plain = {package_name(r) for r in project["dependencies"]}
    engine = {package_name(r) for r in project["optional-dependencies"]["engine"]}
    assert not plain & ENGINE_PACKAGES and ENGINE_PACKAGES <= engine
    stages = dockerfile_stages()
    api_runs = " ".join(args for stage in chain(stages, "api") for op, args in stage.instructions if op == "RUN")
    worker_runs = " ".join(args for stage in chain(stages, "worker") for op, args in stage.instructions
                           if op == "RUN")
    assert "pip install -r /tmp/requirements-api.txt" in api_runs and "requirements-worker" not in \
        api_runs.replace("open('/tmp/requirements-worker.txt'", "")
    assert "pip install -r /tmp/requirements-worker.txt" in worker_runs
    # What the base stage writes into the two requirement files, run here on this pyproject.toml.
    script = next(args for op, args in stages["base"].instructions if op == "RUN" and "tomllib" in args)
    code = re.search(r'python -c "(.*)"', script).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    subprocess.run([sys.executable, "-c", code.replace("/tmp/", "./")], cwd=tmp_path, check=True)
    api = {package_name(r) for r in (tmp_path / "requirements-api.txt").read_text().split()}
    worker = {package_name(r) for r in (tmp_path / "requirements-worker.txt").read_text().split()}
    assert api == plain and worker == plain | engine


def test_the_api_runs_where_torch_cannot_be_imported(tmp_path):
    """The API process (app, routes, validation, enqueue) with torch, timm and the worker package
    made unimportable: it starts, validates a job, checks an uploaded model and answers."""
    code = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'worker'):
            raise ImportError('the API must not import ' + name)
sys.meta_path.insert(0, Refuse())
from fastapi.testclient import TestClient
from service.app import create_app
from storage.settings import Settings, prepare_local_folders
from storage.migrate import upgrade
from storage.db import session_scope
from storage.keys import create_key
settings = Settings(home={str(tmp_path)!r}, data_roots={str(ROOT / 'tests' / 'fixtures')!r})
prepare_local_folders(settings)
upgrade(settings.database_url)
with session_scope(settings.database_url) as session:
    key = create_key(session, 'alice').raw
with TestClient(create_app(settings)) as client:
    headers = {{'Authorization': 'Bearer ' + key}}
    assert client.get('/v1/models', headers=headers).status_code == 200
    answer = client.post('/v1/jobs', headers=headers, json={{'model': 'local-dir:{ROOT}/tests/fixtures/fmnist_vit',
                                                            'dataset': '{ROOT}/tests/fixtures/fmnist16'}})
    assert answer.status_code == 202, answer.text
    model = '{ROOT}/tests/fixtures/fmnist_vit'
    with open(model + '/config.json', 'rb') as config, open(model + '/model.safetensors', 'rb') as weights:
        uploaded = client.post('/v1/models', headers=headers, files={{'config': config, 'weights': weights}})
    assert uploaded.status_code == 201 and uploaded.json()['architecture'] == 'vit_tiny_patch16_224', uploaded.text
print('API ran without', sorted(m for m in ('torch', 'timm', 'worker') if m not in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "API ran without ['timm', 'torch', 'worker']" in result.stdout


def test_the_wheel_holds_the_migrations_and_the_engine_data(tmp_path):
    """`pip install .` (not editable, as in the images) must carry the files found next to the code: the
    top-level migrations/ folder (as the package erq_migrations) and every package of the tree."""
    source = tmp_path / "source"  # a copy of the tracked files: building in place would write into the checkout
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    packages = {str(init.parent.relative_to(source)) for init in source.glob("*/**/__init__.py")
                if init.parts[len(source.parts)] not in ("tests", "bench", "migrations")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("erq-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = {f"erq_migrations/versions/{p.name}" for p in (ROOT / "migrations/versions").glob("*.py")}
    assert len(versions) >= 5
    assert {"erq_migrations/env.py", "erq_migrations/script.py.mako", "erq_core/timm_models.txt",
            "storage/queue.py", "storage/migrate.py", "erq_cli.py", "erq_client/client.py", "erq_client/cli.py",
            "service/ui/index.html", "service/ui/app.js", "service/ui/style.css"} \
        | versions <= names
    assert {f"{package}/__init__.py" for package in packages} <= names, "a package is missing from pyproject's list"
    assert not any(name.startswith(("jobspec/", "migrations/", "tests/", "bench/")) for name in names)


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    subprocess.run([binary, "config", "-q"], cwd=ROOT, check=True)
    import yaml

    rendered = subprocess.run([binary, "config"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(rendered)


def test_compose_file_validates_with_the_required_services(compose):
    assert {"api", "worker", "redis", "postgres", "migrate"} <= set(compose["services"])
    assert {"artifacts", "postgres", "redis", "hf-cache"} <= set(compose["volumes"])
    assert compose["services"]["worker"]["environment"]["ERQ_BROKER_URL"].startswith("redis://")
    assert compose["services"]["api"]["build"]["target"] == "api"
    assert compose["services"]["worker"]["build"]["target"] == "worker"


def test_compose_gives_the_worker_every_gpu_one_slot_each(compose):
    worker = compose["services"]["worker"]
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == "all"
    assert worker["command"][:3] == ["erq", "worker", "--concurrency"]  # slot i on GPU i (worker/cli.py)
    assert worker["environment"]["ERQ_DEVICE"] == "cuda"  # refuses to start without a GPU


def test_compose_health_checks_and_start_order(compose):
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["erq", "migrate"]
    worker = services["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "erq", "worker", "--healthcheck"]
    assert "8000" not in " ".join(worker["healthcheck"]["test"])


def test_compose_stops_workers_slower_than_their_warm_shutdown(compose):
    from worker.cli import SLOT_STOP_SECONDS

    grace = compose["services"]["worker"]["stop_grace_period"]
    seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
    assert seconds > SLOT_STOP_SECONDS


def test_the_hugging_face_cache_volume_is_mounted_where_the_image_user_can_write(compose):
    worker = compose["services"]["worker"]
    mount = next(v for v in worker["volumes"] if v.startswith("hf-cache:") or
                 (isinstance(v, dict) and v.get("source") == "hf-cache"))
    target = mount.split(":")[1] if isinstance(mount, str) else mount["target"]
    assert worker["environment"]["HF_HOME"] == target
    runs = " ".join(args for stage in chain(dockerfile_stages(), "worker") for op, args in stage.instructions
                    if op == "RUN")
    assert f"mkdir -p {target}" in runs and f"chown erq:erq {target}" in runs  # a new volume takes its owner


def test_the_s3_override_points_the_api_and_workers_at_the_s3_service():
    """docker-compose.s3.yml with the s3 profile: a pinned S3 server with a health check, and the API
    and workers storing artifacts in its bucket once it is healthy (the other services unchanged)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    import yaml

    command = [binary, "-f", "docker-compose.yml", "-f", "docker-compose.s3.yml", "config"]
    env = {**os.environ, "COMPOSE_PROFILES": "s3"}
    subprocess.run([*command, "-q"], cwd=ROOT, check=True, env=env)
    services = yaml.safe_load(subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True,
                                             env=env).stdout)["services"]
    s3 = services["s3"]
    image, tag = s3["image"].rsplit(":", 1)
    assert image == "chrislusf/seaweedfs" and tag[0].isdigit()  # pinned, never latest
    assert "/healthz" in " ".join(s3["healthcheck"]["test"])
    for name in ("api", "worker"):
        service = services[name]
        assert service["environment"]["ERQ_ARTIFACT_URL"].startswith("s3://")
        assert service["environment"]["ERQ_S3_ENDPOINT_URL"] == "http://s3:8333"
        assert service["environment"]["ERQ_BROKER_URL"].startswith("redis://")  # the base file's still there
        assert service["depends_on"]["s3"]["condition"] == service["depends_on"]["postgres"]["condition"] == \
            "service_healthy"
    assert s3["profiles"] == ["s3"]  # without the profile, no S3 server starts
