"""Inputs that once answered 500: each now answers the 4xx (or 503) that says what to do, through the
one problem path. (Range headers: test_api.py and test_s3.py, through conftest.assert_range_answers.)"""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.service.conftest import ON_SQLITE, end_job_with_files
from tests.service.test_api import submit

PROBLEM = "application/problem+json"


def _is_problem(answer, status: int, code: str) -> dict:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith(PROBLEM), answer.headers
    body = answer.json()
    assert body["code"] == code and body["status"] == status and body["detail"], body
    return body


@ON_SQLITE
@pytest.mark.parametrize("field", ["dataset", "model", "checkpoint"])
def test_a_path_with_a_component_over_255_bytes_answers_422(client, alice, data_root, field):
    long_path = str(data_root / ("x" * 300) / "more")  # under the roots: only the file system can refuse it
    value = {"dataset": long_path, "model": f"local-dir:{long_path}", "checkpoint": long_path + ".safetensors"}[field]
    body = _is_problem(submit(client, alice, **{field: value}), 422, "invalid_path")
    assert body["field"] == field and "File name too long" in body["detail"]


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
@pytest.mark.parametrize("bound", ["created_after", "created_before"])
def test_a_listing_bound_outside_the_years_of_utc_answers_422(client, alice, moment, bound):
    submit(client, alice)
    body = _is_problem(client.get("/v1/jobs", params={bound: moment}, headers=alice), 422, "validation_error")
    assert body["field"] == bound and "outside the years 1 to 9999 in UTC" in body["detail"]
    assert client.get("/v1/jobs", params={bound: "2000-01-01T00:00:00+14:00"}, headers=alice).status_code == 200


def _ended_job(client, headers, settings) -> dict:
    job_id = submit(client, headers).json()["id"]
    end_job_with_files(settings, job_id, {"config.json": b'{"w_bits": 4}', "job.log": b"done\n",
                                          "metrics.json": b"{}", "quantized.safetensors": b"0123456789" * 100})
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` bind-mounted read-only onto itself (a volume mounted read-only: writes fail with
    EROFS, for root too). Needs root with CAP_SYS_ADMIN; elsewhere the test is skipped."""
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder read-only here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@ON_SQLITE
def test_deleting_a_job_on_a_read_only_artifact_volume_answers_503_and_keeps_the_job(client, alice, settings):
    job = _ended_job(client, alice, settings)
    job_dir = Path(settings.artifact_dir) / job["id"]
    with read_only(Path(settings.artifact_dir)):
        body = _is_problem(client.delete(f"/v1/jobs/{job['id']}", headers=alice), 503, "artifact_store_unavailable")
        assert "Read-only file system" in body["detail"] and "the job is kept" in body["detail"]
        assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
        assert sorted(p.name for p in (job_dir / "attempt-1").iterdir()) == sorted(a["name"] for a in job["artifacts"])
    assert client.delete(f"/v1/jobs/{job['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 404 and not job_dir.exists()
