"""`erq submit --dataset ./folder --model ./folder` uploads what the server cannot read, with a
progress bar, and `erq datasets` / `erq models` manage the uploads, against a real `erq api`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, env_without_data_roots, make_key
from tests.service.processes import ERQ, api_process

pytestmark = pytest.mark.integration


def erq(args: list[str], env: dict, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ERQ, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@ON_SQLITE
def test_submit_uploads_local_folders_the_server_cannot_read_and_the_upload_commands(tmp_path, settings):
    env = env_without_data_roots(tmp_path, settings)
    work = tmp_path / "laptop"  # the user's folders, which the server cannot see
    shutil.copytree(FIXTURE_DATASET, work / "fmnist16")
    shutil.copytree(FIXTURE_MODEL_DIR, work / "my-vit")
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        client_env = {**env, "ERQ_API_KEY": make_key(settings, "alice"), "ERQ_SERVER": f"http://127.0.0.1:{port}"}
        submitted = erq(["submit", "--model", "./my-vit", "--dataset", "./fmnist16", "--calib-size", "16"],
                        client_env, work)
        assert submitted.returncode == 0, submitted.stderr
        assert "the server cannot read fmnist16: uploading it" in submitted.stderr
        assert "100.0%" in submitted.stderr  # the progress bar reached its end
        dataset_spec = re.search(r"uploaded fmnist16 as (dataset:\w+)", submitted.stderr).group(1)
        model_spec = re.search(r"uploaded my-vit as (upload:\w+)", submitted.stderr).group(1)
        job_id = re.search(r"job (\w+) queued", submitted.stdout).group(1)
        shown = json.loads(erq(["jobs", "show", job_id], client_env, work).stdout)
        assert (shown["params"]["dataset"], shown["params"]["model"]) == (dataset_spec, model_spec)

        again = erq(["submit", "--model", "./my-vit", "--dataset", "./fmnist16", "--calib-size", "16", "--quiet"],
                    client_env, work)
        assert again.returncode == 0 and f"as {dataset_spec} " in again.stderr  # the same files: the same upload
        assert "%" not in again.stderr

        listed = erq(["datasets", "list"], client_env, work)
        assert listed.returncode == 0 and dataset_spec in listed.stdout and "320 train / 1000 val" in listed.stdout
        dataset_id = dataset_spec.split(":")[1]
        assert json.loads(erq(["datasets", "show", dataset_id], client_env, work).stdout)["train_images"] == 320
        models = erq(["models", "list", "--json"], client_env, work).stdout.splitlines()
        assert [json.loads(line)["spec"] for line in models] == [model_spec]

        refused = erq(["datasets", "delete", dataset_id], client_env, work)
        assert refused.returncode == 2 and "queued or running" in refused.stderr and "upload_in_use" in refused.stderr
        for line in erq(["jobs", "list", "--json"], client_env, work).stdout.splitlines():
            erq(["jobs", "cancel", json.loads(line)["id"]], client_env, work)
        deleted = erq(["datasets", "delete", dataset_id], client_env, work)
        assert deleted.returncode == 0 and f"dataset {dataset_id} deleted" in deleted.stdout
        missing = erq(["datasets", "show", dataset_id], client_env, work)
        assert missing.returncode == 2 and "upload_not_found" in missing.stderr

        archive = shutil.make_archive(str(tmp_path / "ds"), "zip", work / "fmnist16")
        uploaded = erq(["datasets", "upload", archive, "--quiet"], client_env, work)
        assert uploaded.returncode == 0 and json.loads(uploaded.stdout)["val_images"] == 1000

        unknown = erq(["submit", "--model", "./no-such-folder", "--dataset", "./fmnist16"], client_env, work)
        assert unknown.returncode == 2 and "uploading" not in unknown.stderr  # not a local path: the refusal stands
