"""erq_client and `erq submit` / `erq jobs` against a real `erq api` and `erq worker`."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erq_core.config import fields
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, make_key, service_env
from tests.service.processes import ERQ, api_process, erq_process

MODEL = f"local-dir:{FIXTURE_MODEL_DIR}"
ROOT = Path(__file__).resolve().parents[2]


def erq(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ERQ, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_the_client_imports_neither_torch_nor_the_service():
    code = ("import sys, erq_client, erq_client.cli; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'service', 'storage', 'worker', "
            "'sqlalchemy', 'celery', 'fastapi')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_submit_offers_every_job_parameter_of_erqconfig():
    from erq_client.cli import submit_parser

    dests = {action.dest for action in submit_parser()._actions}
    assert {spec.name for spec in fields() if spec.option.rest} <= dests
    assert not {spec.name for spec in fields() if not spec.option.rest} & dests  # e.g. random_init stays local


@pytest.mark.integration
def test_submit_checks_the_bounds_of_erqconfig_before_sending(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ERQ_API_KEY": "erq_unused"}
    refused = erq(["submit", "--server", "http://127.0.0.1:1", "--model", MODEL, "--dataset", "/d", "--w-bits", "9"],
                  env, tmp_path)
    assert refused.returncode == 2 and "w_bits must be an integer from 2 to 8, got 9" in refused.stderr
    no_key = erq(["jobs", "list", "--server", "http://127.0.0.1:1"], {**env, "ERQ_API_KEY": ""}, tmp_path)
    assert no_key.returncode == 1 and "ERQ_API_KEY" in no_key.stderr
    unreachable = erq(["jobs", "list", "--server", "http://127.0.0.1:1"], env, tmp_path)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


@ON_SQLITE
@pytest.mark.integration
def test_submit_wait_download_and_the_jobs_commands(tmp_path, settings):
    import erq_core

    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url)
    key = make_key(settings, "alice")
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        server = f"http://127.0.0.1:{port}"
        client_env = {**os.environ, "PYTHONPATH": str(ROOT), "ERQ_API_KEY": key, "ERQ_SERVER": server}
        submitted = erq(["submit", "--server", server, "--model", MODEL, "--dataset", str(FIXTURE_DATASET),
                         "--w-bits", "4", "--val-limit", "50", "--metadata", "team=vision", "--export", "onnx",
                         "--wait", "--out", str(tmp_path / "result")], client_env, tmp_path)
        assert submitted.returncode == 0, submitted.stderr + submitted.stdout
        job_id = submitted.stdout.split()[1]
        assert f"job {job_id} succeeded" in submitted.stdout and "quantized: top1" in submitted.stdout
        assert "100.0%" in submitted.stderr and "[####" in submitted.stderr  # the bar, from the event stream
        folder = tmp_path / "result"
        published = {a["name"]: a["sha256"] for a in json.loads(erq(["jobs", "show", job_id], client_env,
                                                                    tmp_path).stdout)["artifacts"]}
        assert {"model.onnx", "report.html", "quantized.safetensors", "config.json", "metrics.json"} <= set(published)
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == published
        for name in published:  # and it says where each went
            assert f"downloaded {name} -> {folder / name}" in submitted.stdout

        listed = erq(["jobs", "list", "--metadata", "team=vision", "--json"], client_env, tmp_path)
        assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [job_id]
        table = erq(["jobs", "list"], client_env, tmp_path)
        assert job_id in table.stdout and "succeeded" in table.stdout
        shown = json.loads(erq(["jobs", "show", job_id], client_env, tmp_path).stdout)
        assert shown["metadata"] == {"team": "vision"} and shown["params"]["w_bits"] == 4
        log = erq(["jobs", "log", job_id], client_env, tmp_path)
        assert "succeeded" in log.stdout
        again = erq(["jobs", "download", job_id, "--out", str(tmp_path / "again")], client_env, tmp_path)
        assert again.returncode == 0
        for name in ("quantized.safetensors", "model.onnx", "report.html"):
            assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name
        finished = erq(["jobs", "cancel", job_id], client_env, tmp_path)
        assert finished.returncode == 2 and "already succeeded" in finished.stderr and "[job_finished]" in finished.stderr

        queued = erq(["submit", "--model", MODEL, "--dataset", str(FIXTURE_DATASET), "--calib-size", "320"],
                     client_env, tmp_path)
        slow_id = queued.stdout.split()[1]
        assert erq(["jobs", "cancel", slow_id], client_env, tmp_path).returncode == 0
        follow = erq(["jobs", "log", slow_id, "--follow"], client_env, tmp_path, timeout=120)
        assert follow.returncode == 0
        assert erq(["jobs", "delete", job_id], client_env, tmp_path).returncode == 0
        gone = erq(["jobs", "show", job_id], client_env, tmp_path)
        assert gone.returncode == 2 and "[job_not_found]" in gone.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    result = erq_core.evaluate_quantized(folder, FIXTURE_DATASET, val_limit=50, device="cpu")
    assert result["top1"] == metrics["quantized"]["top1"]


@ON_SQLITE
@pytest.mark.integration
def test_the_library_follows_events_and_reports_problems(tmp_path, settings):
    from erq_client import ErqClient, ErqClientError

    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url)
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with ErqClient(f"http://127.0.0.1:{port}", api_key=make_key(settings, "alice")) as client:
            with pytest.raises(ErqClientError) as refused:
                client.submit({"model": MODEL, "dataset": "/etc"})
            assert (refused.value.status, refused.value.code, refused.value.field) == (422, "path_outside_roots",
                                                                                       "dataset")
            job = client.submit({"model": MODEL, "dataset": str(FIXTURE_DATASET)}, metadata={"k": "v"})
            seen = []
            follower = __import__("threading").Thread(target=lambda: seen.append(client.wait(job["id"], seen.append)))
            follower.start()
            time.sleep(1.5)
            client.cancel(job["id"])
            follower.join(30)
            assert seen[-1]["status"] == "cancelled" and seen[0].kind == "status"
            assert [j["id"] for j in client.iter_jobs(metadata={"k": "v"}, limit=1)] == [job["id"]]


@ON_SQLITE
@pytest.mark.integration
def test_wait_asks_again_while_the_owners_event_streams_are_all_open(tmp_path, settings):
    """ERQ_MAX_EVENT_STREAMS_PER_OWNER=1 and the owner's one stream held elsewhere: the client's stream
    is refused with 429, asked again after Retry-After, and follows the job once the other closes."""
    import threading

    from erq_client import ErqClient
    from tests.service.processes import api_client, wait_for_text

    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_MAX_EVENT_STREAMS_PER_OWNER="1")
    key, api_log = make_key(settings, "alice"), tmp_path / "api.log"
    with api_process(["api"], env, tmp_path, api_log) as (api, port):
        with ErqClient(f"http://127.0.0.1:{port}", api_key=key) as client, api_client(port, key) as other:
            job = client.submit({"model": MODEL, "dataset": str(FIXTURE_DATASET)})
            events_route = f"/v1/jobs/{job['id']}/events HTTP/1.1"
            ended: list[dict] = []
            follower = threading.Thread(target=lambda: ended.append(client.wait(job["id"])), daemon=True)
            with other.stream("GET", f"/v1/jobs/{job['id']}/events") as held:
                lines = held.iter_lines()  # kept referenced: a collected iterator closes the stream
                assert held.status_code == 200 and next(lines).startswith("retry:")
                follower.start()
                wait_for_text(api_log, f'{events_route}" 429', process=api)
            other.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
            follower.join(90)
    assert not follower.is_alive() and ended and ended[0]["status"] == "cancelled", ended
    assert api_log.read_text().count(f'{events_route}" 200') == 2  # the held stream, then the client's
