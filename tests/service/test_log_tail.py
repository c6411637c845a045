"""`GET /v1/jobs/{id}/log?offset=N`: tailing a job's log without downloading it again."""
from __future__ import annotations

import time

import pytest

from storage import jobs
from storage.artifacts import stored_file
from storage.db import session_scope
from storage.artifacts.folder import FolderStore
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, worker_and_api

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


def _running_job_with_log(client, alice, settings, content: bytes) -> tuple[str, object]:
    job_id = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    with session_scope(settings.database_url) as session:
        attempt = jobs.claim(session, job_id, "w1").attempts
    folder = FolderStore(settings.artifact_dir).fresh_run_dir(job_id, f"attempt-{attempt}")
    (folder / "job.log").write_bytes(content)
    return job_id, folder / "job.log"


@ON_SQLITE
def test_a_log_is_read_from_an_offset_and_says_where_to_go_on(client, alice, settings):
    job_id, log = _running_job_with_log(client, alice, settings, b"line one\nline two\n")
    whole = client.get(f"/v1/jobs/{job_id}/log", headers=alice)
    assert whole.text == "line one\nline two\n" and whole.headers["Erq-Next-Offset"] == "18"
    tail = client.get(f"/v1/jobs/{job_id}/log?offset=9", headers=alice)
    assert tail.text == "line two\n" and tail.headers["Erq-Next-Offset"] == "18"
    assert tail.headers["Erq-Log-Complete"] == "false"  # the job still runs
    with open(log, "ab") as handle:
        handle.write("dé".encode()[:2])  # half of a two-byte character: not sent yet
    chunk = client.get(f"/v1/jobs/{job_id}/log?offset=18", headers={**alice, "Accept": "application/json"}).json()
    assert chunk == {"offset": 18, "next_offset": 19, "complete": False, "text": "d"}
    with open(log, "ab") as handle:
        handle.write("dé".encode()[2:] + b" done\n")
    chunk = client.get(f"/v1/jobs/{job_id}/log?offset=19", headers={**alice, "Accept": "application/json"}).json()
    assert chunk["text"] == "é done\n" and chunk["next_offset"] == log.stat().st_size
    answer = client.get(f"/v1/jobs/{job_id}/log?offset=1000", headers=alice)
    assert answer.status_code == 416 and answer.json()["code"] == "offset_past_end"
    assert client.get(f"/v1/jobs/{job_id}/log?offset=-1", headers=alice).status_code == 422


@ON_SQLITE
def test_an_ended_jobs_log_is_complete_at_its_end(client, alice, settings):
    job_id, log = _running_job_with_log(client, alice, settings, b"x" * 10)
    with session_scope(settings.database_url) as session:
        jobs.finish(session, job_id, jobs.JobStatus.FAILED, "broken", worker="w1", run=log.parent.name,
                    stored=[stored_file(log.parent, "job.log")])
    first = client.get(f"/v1/jobs/{job_id}/log?offset=4", headers=alice)
    assert first.text == "xxxxxx" and first.headers["Erq-Log-Complete"] == "true"


@ON_SQLITE
@pytest.mark.integration
def test_tailing_a_real_jobs_log_by_offsets_gives_the_whole_log(tmp_path, settings):
    with worker_and_api(tmp_path, settings) as client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        offset, pieces, requests = 0, [], 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            answer = client.get(f"/v1/jobs/{job_id}/log", params={"offset": offset})
            assert answer.status_code == 200, answer.text
            assert int(answer.headers["Erq-Next-Offset"]) == offset + len(answer.content)
            pieces.append(answer.content)
            offset, requests = int(answer.headers["Erq-Next-Offset"]), requests + 1
            if answer.headers["Erq-Log-Complete"] == "true":
                break
            time.sleep(0.2)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        whole = client.get(f"/v1/jobs/{job_id}/log").content
    assert b"".join(pieces) == whole and b"succeeded" in whole
    assert requests > 2 and sum(1 for p in pieces if p) >= 2  # it came in several pieces
