"""A job from an uploaded dataset and an uploaded model, end to end on real `erq api` and `erq
worker` processes whose ERQ_DATA_ROOTS hold nothing: with the folder store, and with artifacts in
S3 (SeaweedFS), where API and worker share no folder at all. The job computes what the engine
computes on the original folders."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR, FIXTURE_VAL_LIMIT
from tests.service.conftest import make_key, service_env
from tests.service.processes import api_client, api_process, erq_process, wait_for_job
from tests.upload_archives import tar_folder, zip_folder

pytestmark = pytest.mark.integration


@contextmanager
def api_and_worker(tmp_path: Path, api_env: dict, worker_env: dict) -> Iterator[httpx.Client]:
    with erq_process(["worker"], worker_env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], api_env, tmp_path, tmp_path / "api.log") as (api, port):
        key = make_key_for(api_env)
        with api_client(port, key) as client:
            yield client


def make_key_for(env: dict) -> str:
    from storage.settings import Settings

    return make_key(Settings(home=Path(env["ERQ_HOME"]), database_url=env["ERQ_DATABASE_URL"]), "alice")


def homes(tmp_path: Path, shared_artifacts: bool) -> tuple[dict, dict]:
    """Environments of an API and a worker with their own homes and empty data roots; they share the
    database and the broker (and the artifact folder when `shared_artifacts`)."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    common = {"ERQ_DATABASE_URL": f"sqlite:///{tmp_path / 'erq.sqlite'}",
              "ERQ_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", "ERQ_DATA_ROOTS": str(empty)}
    api = service_env(tmp_path / "api-host", **common)
    worker = service_env(tmp_path / "worker-host", **common)
    if shared_artifacts:
        worker["ERQ_ARTIFACT_DIR"] = api["ERQ_ARTIFACT_DIR"]
    return api, worker


def upload_and_run(client: httpx.Client, tmp_path: Path) -> tuple[dict, dict, dict]:
    """Upload the fixture dataset (zip) and model (tar.gz of its folder), run W4/A4 on them."""
    dataset_zip = zip_folder(FIXTURE_DATASET, tmp_path / "fmnist16.zip", inside="fmnist16")
    model_tar = tar_folder(FIXTURE_MODEL_DIR, tmp_path / "fmnist_vit.tar.gz")
    dataset = client.post("/v1/datasets", content=dataset_zip.read_bytes(),
                          headers={"Content-Type": "application/zip"})
    assert dataset.status_code == 201, dataset.text
    model = client.post("/v1/models", content=model_tar.read_bytes(), headers={"Content-Type": "application/gzip"})
    assert model.status_code == 201, model.text
    submitted = client.post("/v1/jobs", json={"model": model.json()["spec"], "dataset": dataset.json()["spec"],
                                              "w_bits": 4, "a_bits": 4, "calib_size": 32,
                                              "val_limit": FIXTURE_VAL_LIMIT})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"], ("succeeded", "failed", "cancelled"), seconds=600)
    assert job["status"] == "succeeded", job
    return dataset.json(), model.json(), job


def assert_same_as_the_engine_on_the_folders(job: dict, erq_w4a4_run) -> None:
    _, metrics = erq_w4a4_run  # the same configuration, run in process on tests/fixtures
    for name in ("fp", "quantized"):
        assert job["metrics"][name]["top1"] == metrics[name]["top1"], (name, job["metrics"][name], metrics[name])


def assert_downloads_match(client: httpx.Client, job: dict) -> None:
    checkpoint = next(a for a in job["artifacts"] if a["name"] == "quantized.safetensors")
    body = client.get(checkpoint["url"], follow_redirects=True)
    assert body.status_code == 200 and hashlib.sha256(body.content).hexdigest() == checkpoint["sha256"]
    # the run names the uploads as the job did, not by a folder of the worker's cache
    urls = {a["name"]: a["url"] for a in job["artifacts"]}
    config = client.get(urls["config.json"], follow_redirects=True).json()
    params = job["params"]
    assert (config["erq_config"]["model"], config["erq_config"]["dataset"]) == (params["model"], params["dataset"])
    assert config["model_source"]["spec"] == params["model"]
    report = client.get(urls["report.html"], follow_redirects=True).text
    assert f"<h1>{params['model']}:" in report and "upload-cache" not in report


def test_an_uploaded_dataset_and_model_run_with_the_folder_store(tmp_path, erq_w4a4_run):
    api_env, worker_env = homes(tmp_path, shared_artifacts=True)
    with api_and_worker(tmp_path, api_env, worker_env) as client:
        dataset, model, job = upload_and_run(client, tmp_path)
        assert_same_as_the_engine_on_the_folders(job, erq_w4a4_run)
        assert_downloads_match(client, job)
        cache = Path(worker_env["ERQ_HOME"]) / "upload-cache"
        assert {p.name for p in cache.iterdir() if p.is_dir()} == {dataset["sha256"], model["sha256"]}
        assert not (Path(api_env["ERQ_HOME"]) / "upload-cache").exists()  # the API never extracts


def test_an_uploaded_dataset_and_model_run_with_artifacts_in_s3_and_nothing_shared(tmp_path, s3_server, s3_bucket,
                                                                                   erq_w4a4_run):
    api_env, worker_env = homes(tmp_path, shared_artifacts=False)
    for env in (api_env, worker_env):
        env.update(s3_server.env(f"s3://{s3_bucket}/erq"))
    with api_and_worker(tmp_path, api_env, worker_env) as client:
        dataset, model, job = upload_and_run(client, tmp_path)
        assert_same_as_the_engine_on_the_folders(job, erq_w4a4_run)
        assert_downloads_match(client, job)
        listing = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="erq/uploads/")
        assert {item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", [])} == {dataset["sha256"],
                                                                                            model["sha256"]}
        for home in (api_env["ERQ_HOME"], worker_env["ERQ_HOME"]):
            assert not (Path(home) / "artifacts" / "uploads").exists()  # neither host keeps uploads on disk
        cache = Path(worker_env["ERQ_HOME"]) / "upload-cache"
        assert {p.name for p in cache.iterdir() if p.is_dir()} == {dataset["sha256"], model["sha256"]}
        # Deleted: gone from the bucket, and the job's record still reads.
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        listing = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="erq/uploads/")
        assert {item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", [])} == {model["sha256"]}
        assert client.get(f"/v1/jobs/{job['id']}").json()["params"]["dataset"] == dataset["spec"]
