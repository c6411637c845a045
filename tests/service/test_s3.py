"""Artifacts in an S3 bucket (ERQ_ARTIFACT_URL=s3://...), against a real S3 server (SeaweedFS) and
real `erq` processes: uploads in parts and their verification, a job end to end with downloads by
redirect and by stream (ETag, sha256, Range), and a job whose files cannot be stored."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage.artifacts import ArtifactStoreError
from storage.artifacts.s3 import S3Store, local_digest
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.s3_server import READER, WRITER
from tests.service.conftest import assert_range_answers, run_erq, service_env
from tests.service.processes import api_client, api_process, serving, wait_for_job, wait_for_text
from tests.service.tcp_proxy import CountingListener

QUICK_JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "calib_size": 32,
             "val_limit": 50}
NAMES = {"quantized.safetensors", "config.json", "metrics.json", "report.html", "job.log"}


@pytest.fixture
def as_writer(monkeypatch):
    """The AWS variables of the identity that may write (boto3 reads them as any deployment would)."""
    for name, value in (("AWS_ACCESS_KEY_ID", WRITER[0]), ("AWS_SECRET_ACCESS_KEY", WRITER[1]),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)


def _keys(s3_server, bucket: str, prefix: str = "") -> set[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def test_large_files_go_up_in_parts_and_are_verified(tmp_path, s3_server, s3_bucket, as_writer):
    store = S3Store(f"s3://{s3_bucket}/runs", tmp_path / "scratch", s3_server.endpoint_url, multipart_mb=5)
    folder = store.fresh_workspace("job1", "attempt-1")
    checkpoint = os.urandom(11 * (1 << 20) + 123)
    (folder / "quantized.safetensors").write_bytes(checkpoint)
    (folder / "job.log").write_text("a line\n")

    stored = {f.name: f for f in store.store_run("job1", "attempt-1", folder, ["quantized.safetensors", "job.log",
                                                                               "config.json"])}
    assert set(stored) == {"quantized.safetensors", "job.log"}  # absent files are not invented
    assert stored["quantized.safetensors"].sha256 == hashlib.sha256(checkpoint).hexdigest()
    assert stored["quantized.safetensors"].size == len(checkpoint)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/job1/attempt-1/quantized.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB: a multipart upload
    assert head["Metadata"]["sha256"] == stored["quantized.safetensors"].sha256
    ranged = httpx.get(store.presigned_url("job1", "attempt-1", "quantized.safetensors"),
                       headers={"Range": "bytes=5242870-5242889"})
    assert ranged.status_code == 206 and ranged.content == checkpoint[5242870:5242890]  # across a part boundary
    assert store.read_text("job1", "attempt-1", "job.log") == "a line\n"

    store.release_workspace("job1", "attempt-1")
    assert not (tmp_path / "scratch" / "job1").exists()


def test_an_object_that_differs_from_the_written_file_fails_verification(tmp_path, s3_server, s3_bucket, as_writer):
    store = S3Store(f"s3://{s3_bucket}", tmp_path / "scratch", s3_server.endpoint_url)
    folder = store.fresh_workspace("job1", "attempt-1")
    (folder / "metrics.json").write_text('{"top1": 0.9}')
    store.store_run("job1", "attempt-1", folder, ["metrics.json"])
    key = store.key("job1", "attempt-1", "metrics.json")
    store.verify(key, local_digest(folder / "metrics.json"))  # what was stored checks out

    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b'{"top1": 0.1}')  # same size, other bytes
    with pytest.raises(ArtifactStoreError, match="sha256"):
        store.verify(key, local_digest(folder / "metrics.json"))
    (folder / "metrics.json").write_text('{"top1": 0.95}')
    with pytest.raises(ArtifactStoreError, match="bytes stored"):
        store.verify(key, local_digest(folder / "metrics.json"))


def test_credentials_that_cannot_write_make_storing_fail_with_the_reason(tmp_path, s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    store = S3Store(f"s3://{s3_bucket}/p", tmp_path / "scratch", s3_server.endpoint_url)
    folder = store.fresh_workspace("job1", "attempt-1")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArtifactStoreError, match=f"config.json as s3://{s3_bucket}/p/job1/attempt-1/config.json.*"
                                                 "AccessDenied"):
        store.store_run("job1", "attempt-1", folder, ["config.json"])
    assert _keys(s3_server, s3_bucket) == set()


def test_other_runs_are_removed_and_the_winner_kept(tmp_path, s3_server, s3_bucket, as_writer):
    store = S3Store(f"s3://{s3_bucket}/p", tmp_path / "scratch", s3_server.endpoint_url)
    for run in ("attempt-1", "attempt-2"):
        folder = store.fresh_workspace("job1", run)
        (folder / "job.log").write_text(run)
        store.store_run("job1", run, folder, ["job.log"])
    store.remove_other_runs("job1", keep="attempt-2")
    assert _keys(s3_server, s3_bucket) == {"p/job1/attempt-2/job.log"}
    store.remove_job("job1")
    assert _keys(s3_server, s3_bucket) == set()


def test_a_bucket_that_refuses_deletes_keeps_the_job_and_says_why(tmp_path, s3_server, s3_bucket, as_writer,
                                                                    monkeypatch, settings):
    """A bulk delete answers refusals per key instead of raising: the store must not take them for done,
    and DELETE /v1/jobs/ID answers 503 with the reason, keeping the job and its files."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import end_job_with_files, make_key

    writer = S3Store(f"s3://{s3_bucket}/erq", tmp_path / "scratch", s3_server.endpoint_url)
    folder = writer.fresh_workspace("job1", "attempt-1")
    (folder / "job.log").write_text("a line\n")
    writer.store_run("job1", "attempt-1", folder, ["job.log"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])  # from here on: an identity that may not delete
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    reader = S3Store(f"s3://{s3_bucket}/erq", tmp_path / "scratch", s3_server.endpoint_url)
    with pytest.raises(ArtifactStoreError, match="AccessDenied"):
        reader.remove_job("job1")
    assert _keys(s3_server, s3_bucket) == {"erq/job1/attempt-1/job.log"}

    s3_settings = settings.model_copy(update={"artifact_url": f"s3://{s3_bucket}/erq",
                                              "s3_endpoint_url": s3_server.endpoint_url})
    with TestClient(create_app(s3_settings)) as api:
        api.headers["Authorization"] = f"Bearer {make_key(s3_settings, 'alice')}"
        job_id = api.post("/v1/jobs", json=QUICK_JOB).json()["id"]
        end_job_with_files(s3_settings, job_id, {"job.log": b"x"}, store=writer)
        answer = api.delete(f"/v1/jobs/{job_id}")
        assert answer.status_code == 503 and answer.json()["code"] == "artifact_store_unavailable", answer.text
        assert "AccessDenied" in answer.json()["detail"] and answer.headers["Retry-After"]
        assert api.get(f"/v1/jobs/{job_id}").status_code == 200
        assert f"erq/{job_id}/attempt-1/job.log" in _keys(s3_server, s3_bucket)


def _s3_env(tmp_path: Path, s3_server, bucket: str, credentials=WRITER, **overrides: str) -> dict:
    return service_env(tmp_path, **s3_server.env(f"s3://{bucket}/erq", credentials), **overrides)


def _finished(client: httpx.Client, job_id: str) -> dict:
    return wait_for_job(client, job_id, ("succeeded", "failed", "cancelled"), 300)


def test_a_job_end_to_end_with_artifacts_in_a_bucket(tmp_path, s3_server, s3_bucket):
    """`erq serve` with ERQ_ARTIFACT_URL=s3://: the worker uploads, the API redirects to presigned URLs
    (Range works through the redirect); a second API with ERQ_S3_DOWNLOAD=stream serves the same files."""
    env = _s3_env(tmp_path, s3_server, s3_bucket)
    with api_process(["serve"], env, tmp_path, tmp_path / "serve.log") as (serve, port), \
            api_process(["api"], {**env, "ERQ_S3_DOWNLOAD": "stream"}, tmp_path,
                        tmp_path / "api-stream.log") as (stream_api, stream_port):
        key = (tmp_path / "var" / "api-key").read_text().strip()
        with api_client(port, key) as client, api_client(stream_port, key) as streaming:
            answer = client.post("/v1/jobs", json=QUICK_JOB)
            assert answer.status_code == 202, answer.text
            job = _finished(client, answer.json()["id"])
            assert job["status"] == "succeeded", job
            job_id = job["id"]
            artifacts = {a["name"]: a for a in job["artifacts"]}
            assert set(artifacts) == NAMES

            # The files are in the bucket, under the run's prefix, and nowhere on the API's disk.
            assert _keys(s3_server, s3_bucket) == {f"erq/{job_id}/attempt-1/{name}" for name in NAMES}
            assert not (tmp_path / "var" / "artifacts" / job_id).exists()
            assert not any((tmp_path / "var" / "scratch").glob(f"{job_id}/*"))  # the upload's scratch is gone

            checkpoint = _check_redirect_downloads(client, artifacts)
            _check_streamed_downloads(streaming, artifacts, checkpoint)
            for api in (client, streaming):
                assert "succeeded" in api.get(f"/v1/jobs/{job_id}/log").text  # read from the bucket
    assert f"artifacts in s3://{s3_bucket}/erq" in (tmp_path / "serve.log").read_text()  # the worker says where


def _check_redirect_downloads(client: httpx.Client, artifacts: dict) -> bytes:
    url = artifacts["quantized.safetensors"]["url"]
    sha = artifacts["quantized.safetensors"]["sha256"]
    redirect = client.get(url)
    assert redirect.status_code == 307 and redirect.headers["ETag"] == f'"{sha}"'
    assert "X-Amz-Signature=" in redirect.headers["Location"] and "X-Amz-Expires=300" in redirect.headers["Location"]
    assert httpx.get(redirect.headers["Location"].split("?")[0]).status_code == 403  # the bucket is not public

    whole = client.get(url, follow_redirects=True)  # httpx drops the API key on the way to the other origin
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == sha
    assert whole.headers["x-amz-meta-sha256"] == sha
    assert 'filename="quantized.safetensors"' in whole.headers["Content-Disposition"]
    assert len(whole.content) == artifacts["quantized.safetensors"]["size"]
    part = client.get(url, headers={"Range": "bytes=100-299"}, follow_redirects=True)
    assert part.status_code == 206 and part.content == whole.content[100:300]
    assert part.headers["Content-Range"] == f"bytes 100-299/{len(whole.content)}"

    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(whole.content))
    assert head.headers["ETag"] == f'"{sha}"' and head.content == b""
    config = client.get(artifacts["config.json"]["url"], follow_redirects=True)
    assert hashlib.sha256(config.content).hexdigest() == artifacts["config.json"]["sha256"]
    assert config.headers["Content-Type"].startswith("application/json")
    return whole.content


def _check_streamed_downloads(client: httpx.Client, artifacts: dict, checkpoint: bytes) -> None:
    url = httpx.URL(artifacts["quantized.safetensors"]["url"]).path  # the same route on this other API
    sha = artifacts["quantized.safetensors"]["sha256"]
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == checkpoint
    assert whole.headers["ETag"] == f'"{sha}"' and hashlib.sha256(whole.content).hexdigest() == sha
    assert 'filename="quantized.safetensors"' in whole.headers["Content-Disposition"]
    assert_range_answers(client, url, checkpoint)
    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(checkpoint))
    metrics = client.get(httpx.URL(artifacts["metrics.json"]["url"]).path)
    assert hashlib.sha256(metrics.content).hexdigest() == artifacts["metrics.json"]["sha256"]


def _deny_uploads(s3_server, bucket: str) -> None:
    """A bucket policy that refuses every upload, whatever the credentials."""
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject"],
                                                      "Resource": [f"arn:aws:s3:::{bucket}/*"]}]}
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def test_a_job_whose_files_cannot_be_stored_does_not_succeed(tmp_path, s3_server, s3_bucket):
    """Uploads refused after the worker started (its start-up check passed): the run finishes, its
    upload is refused, and the job fails with the reason instead of succeeding with files nobody
    can download."""
    env = _s3_env(tmp_path, s3_server, s3_bucket)
    with serving(tmp_path, env) as (serve, client):
        wait_for_text(tmp_path / "serve.log", "erq worker ready", process=serve)
        _deny_uploads(s3_server, s3_bucket)
        answer = client.post("/v1/jobs", json={**QUICK_JOB, "evaluate": False})
        assert answer.status_code == 202, answer.text
        job = _finished(client, answer.json()["id"])
        assert job["status"] == "failed", job
        assert "could not be stored in the artifact store" in job["error"] and "AccessDenied" in job["error"]
        assert job["artifacts"] == [] and job["metrics"] is None
        assert client.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").status_code == 404
    assert _keys(s3_server, s3_bucket) == set()
    assert not any((tmp_path / "var" / "scratch").glob(f"{job['id']}/*"))


def test_an_artifact_url_that_is_not_s3_is_refused_with_what_to_do():
    from pydantic import ValidationError

    from storage.settings import Settings

    for url in ("http://bucket/prefix", "s3://", "bucket/prefix"):
        with pytest.raises(ValidationError, match="is not an s3://BUCKET"):
            Settings(artifact_url=url)
    assert Settings(artifact_url="").artifact_url is None  # empty: the folder store
    assert Settings(artifact_url="s3://b/p").s3_artifacts


def test_scratch_folders_of_runs_that_cannot_still_run_are_swept(tmp_path):
    from storage.artifacts.s3 import remove_stale_scratch

    old, fresh = tmp_path / "job1" / "attempt-1", tmp_path / "job2" / "attempt-1"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "job.log").write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_scratch(tmp_path, 3600) == 1
    assert not (tmp_path / "job1").exists() and (fresh / "job.log").is_file()


def test_a_running_jobs_log_reaches_the_bucket_and_a_cancelled_run_stores_its_log(tmp_path, s3_server, s3_bucket):
    """The worker copies the log so far at each heartbeat (any API host can show it while the job
    runs); a cancelled job publishes its log only."""
    env = _s3_env(tmp_path, s3_server, s3_bucket, ERQ_LEASE_SECONDS="4")  # a heartbeat a second
    with serving(tmp_path, env) as (_serve, client):
        answer = client.post("/v1/jobs", json={**QUICK_JOB, "calib_size": 320, "val_limit": None})
        job_id = answer.json()["id"]
        wait_for_job(client, job_id, ("running",), 120)
        deadline = time.monotonic() + 60
        while f"job {job_id} on" not in (text := client.get(f"/v1/jobs/{job_id}/log").text):
            assert time.monotonic() < deadline, f"the running job's log never reached the bucket: {text!r}"
            time.sleep(0.5)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert f"erq/{job_id}/attempt-1/job.log" in _keys(s3_server, s3_bucket)
        client.post(f"/v1/jobs/{job_id}/cancel")
        job = _finished(client, job_id)
        assert job["status"] == "cancelled" and [a["name"] for a in job["artifacts"]] == ["job.log"]
        assert "cancelled" in client.get(job["artifacts"][0]["url"], follow_redirects=True).text
    assert _keys(s3_server, s3_bucket) == {f"erq/{job_id}/attempt-1/job.log"}


def test_the_write_check_passes_on_a_bucket_and_leaves_no_probe_behind(tmp_path, s3_server, s3_bucket, as_writer):
    store = S3Store(f"s3://{s3_bucket}/runs", tmp_path / "scratch", s3_server.endpoint_url)
    store.check()
    store.check(write=True)
    assert _keys(s3_server, s3_bucket) == set()


def test_credentials_that_cannot_write_pass_the_read_check_only(tmp_path, s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    store = S3Store(f"s3://{s3_bucket}/runs", tmp_path / "scratch", s3_server.endpoint_url)
    store.check()  # what the API needs
    with pytest.raises(ArtifactStoreError, match=f"access denied: cannot write the object s3://{s3_bucket}/runs/"
                                                 r"\.erq-write-check-.*AWS_ACCESS_KEY_ID"):
        store.check(write=True)
    assert _keys(s3_server, s3_bucket) == set()


def test_a_missing_bucket_or_an_unreachable_endpoint_fails_the_check_with_what_to_fix(tmp_path, s3_server,
                                                                                       as_writer):
    missing = f"erq-missing-{os.urandom(4).hex()}"
    store = S3Store(f"s3://{missing}/runs", tmp_path / "scratch", s3_server.endpoint_url)
    with pytest.raises(ArtifactStoreError, match=f"the bucket '{missing}' does not exist at "
                                                 f"{s3_server.endpoint_url}.*ERQ_ARTIFACT_URL"):
        store.check()

    dropping = CountingListener()  # an endpoint that drops every connection
    down = S3Store(f"s3://{missing}/runs", tmp_path / "scratch", f"http://127.0.0.1:{dropping.port}")
    with pytest.raises(ArtifactStoreError, match="cannot reach the S3 endpoint .*ERQ_S3_ENDPOINT_URL"):
        down.check(write=True)
    dropping.close()
    assert 1 <= dropping.count <= 2  # one attempt (the HTTP layer may reconnect once), not the jobs' client's 5


def _start_worker_quickly_refused(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """`erq worker`'s own code (worker_main), its retry window shortened from 30 s to 2 s."""
    wrapper = ("import sys, worker.cli as cli; cli.ARTIFACT_STORE_WAIT_SECONDS = 2; "
               "cli.ARTIFACT_STORE_RETRY_SECONDS = 0.5; sys.exit(cli.worker_main([]))")
    worker = subprocess.run([sys.executable, "-c", wrapper], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == 2, worker.stderr
    assert worker.stderr.count("not usable yet") >= 2  # it tried again before giving up
    assert "erq worker ready" not in worker.stderr  # refused before loading the engine
    return worker


def test_a_worker_refuses_to_start_on_a_missing_bucket(tmp_path, s3_server):
    missing = f"erq-missing-{os.urandom(4).hex()}"
    worker = _start_worker_quickly_refused(tmp_path, _s3_env(tmp_path, s3_server, missing))
    last_line = worker.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"erq worker: error: the artifact store s3://{missing}/erq is not usable: the bucket "
                                f"'{missing}' does not exist at {s3_server.endpoint_url}"), worker.stderr


def test_a_worker_refuses_to_start_with_credentials_that_may_only_read(tmp_path, s3_server, s3_bucket):
    worker = _start_worker_quickly_refused(tmp_path, _s3_env(tmp_path, s3_server, s3_bucket, credentials=READER))
    last_line = worker.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"erq worker: error: the artifact store s3://{s3_bucket}/erq is not usable: access "
                                f"denied: cannot write the object s3://{s3_bucket}/erq/.erq-write-check-"), \
        worker.stderr
    assert _keys(s3_server, s3_bucket) == set()


def test_readiness_checks_the_bucket(tmp_path, s3_server, s3_bucket):
    """Two real API processes: one on a bucket that exists, one on a bucket that does not."""
    missing = f"erq-missing-{os.urandom(4).hex()}"
    (tmp_path / "bad").mkdir()
    with api_process(["api"], _s3_env(tmp_path, s3_server, s3_bucket), tmp_path,
                     tmp_path / "api.log") as (good, good_port), \
            api_process(["api"], _s3_env(tmp_path / "bad", s3_server, missing), tmp_path,
                        tmp_path / "api-bad.log") as (bad, bad_port):
        ready = httpx.get(f"http://127.0.0.1:{good_port}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok", "artifact_store": "ok"}
        not_ready = httpx.get(f"http://127.0.0.1:{bad_port}/readyz", timeout=30)  # a probe without a key
        assert not_ready.status_code == 503 and not_ready.headers["Retry-After"] == "10"
        checks = not_ready.json()
        assert checks["status"] == "not ready" and checks["database"] == checks["broker"] == "ok"
        assert checks["artifact_store"].startswith("unavailable") and missing not in not_ready.text
        assert s3_server.endpoint_url not in not_ready.text
        bad_env = _s3_env(tmp_path / "bad", s3_server, missing)
        key = run_erq(["admin", "create-key", "ops"], bad_env, tmp_path).stdout.strip().splitlines()[-1]
        keyed = httpx.get(f"http://127.0.0.1:{bad_port}/readyz", headers={"Authorization": f"Bearer {key}"},
                          timeout=30).json()
        assert keyed["artifact_store"].startswith(f"unavailable: the bucket '{missing}' does not exist"), keyed
        assert f"not ready: artifact_store: the bucket '{missing}'" in (tmp_path / "api-bad.log").read_text()
    assert _keys(s3_server, s3_bucket) == set()  # the API only reads
