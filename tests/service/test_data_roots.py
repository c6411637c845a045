"""ERQ_DATA_ROOTS: per-owner roots (`{owner}`) keep one owner's folders from another, at submission
and in the worker; links inside a dataset cannot lead a job out of its roots, and what the job then
reports names nothing outside them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage.settings import Settings
from tests.fixture_paths import FIXTURE_MODEL_DIR, small_dataset
from tests.service.conftest import ON_SQLITE, make_key, worker_and_api
from tests.service.processes import wait_for_job


def job(dataset: Path, model: Path = FIXTURE_MODEL_DIR) -> dict:
    return {"model": f"local-dir:{model}", "dataset": str(dataset), "calib_size": 8, "val_limit": 8}


@pytest.fixture
def per_owner(settings, data_root):
    """ERQ_DATA_ROOTS = DATA/{owner}, with a dataset and a model in alice's folder."""
    small_dataset(data_root / "alice" / "ds")
    shutil.copytree(FIXTURE_MODEL_DIR, data_root / "alice" / "model")
    small_dataset(data_root / "bob" / "ds")
    return settings.model_copy(update={"data_roots": f"{data_root}/{{owner}}"})


@ON_SQLITE
def test_an_owner_cannot_use_nor_discover_another_owners_folders(per_owner, data_root):
    with TestClient(create_app(per_owner)) as client:
        alice = {"Authorization": f"Bearer {make_key(per_owner, 'alice')}"}
        bob = {"Authorization": f"Bearer {make_key(per_owner, 'bob')}"}
        mine = job(data_root / "alice" / "ds", data_root / "alice" / "model")
        assert client.post("/v1/jobs", json=mine, headers=alice).status_code == 202
        answers = {what: client.post("/v1/jobs", json=body, headers=bob) for what, body in (
            ("dataset", mine), ("model", job(data_root / "bob" / "ds", data_root / "alice" / "model")),
            ("missing", job(data_root / "alice" / "no-such-folder")))}
    for what, answer in answers.items():
        problem = answer.json()
        assert answer.status_code == 422 and problem["code"] == "path_outside_roots", (what, problem)
        assert f"({data_root / 'bob'})" in problem["detail"]  # the only root bob is told of is his own
        assert f"{data_root}/{{owner}}" not in problem["detail"] and "'alice'" not in problem["detail"]
    # An existing folder of alice's and a missing one answer alike: nothing tells bob what alice has.
    assert (answers["dataset"].json()["detail"].replace(str(data_root / "alice" / "ds"), "X") ==
            answers["missing"].json()["detail"].replace(str(data_root / "alice" / "no-such-folder"), "X"))


@pytest.mark.parametrize("owner, has_own_root", [("alice", True), ("a/../bob", False), ("..", False)])
def test_only_a_plain_folder_name_gets_a_per_owner_root(tmp_path, owner, has_own_root):
    data_root = tmp_path
    mixed = Settings(data_roots=f"{data_root}/shared:{data_root}/{{owner}}")
    expected = [data_root / "shared"] + ([data_root / owner] if has_own_root else [])
    assert mixed.data_roots_for(owner) == [path.resolve() for path in expected]


@ON_SQLITE
@pytest.mark.integration  # a real worker runs the jobs
def test_a_worker_reads_nothing_a_link_in_the_dataset_leads_to_outside_the_owners_roots(settings, data_root,
                                                                                        tmp_path):
    home = Path(settings.home)  # ERQ_HOME: the database, the broker
    to_home = small_dataset(data_root / "alice" / "to-home")
    (to_home / "train" / "x").symlink_to(home)
    to_bob = small_dataset(data_root / "alice" / "to-bob")
    small_dataset(data_root / "bob" / "ds")
    shutil.rmtree(to_bob / "val")
    (to_bob / "val").symlink_to(data_root / "bob" / "ds" / "val")
    linked_inside = small_dataset(data_root / "alice" / "inside")
    shutil.rmtree(linked_inside / "val")
    (linked_inside / "val").symlink_to(to_home / "val")
    shutil.copytree(FIXTURE_MODEL_DIR, data_root / "alice" / "model")
    model = data_root / "alice" / "model"
    with worker_and_api(tmp_path, settings, ERQ_DATA_ROOTS=f"{data_root}/{{owner}}") as client:
        submitted = {name: client.post("/v1/jobs", json=job(dataset, model)).raise_for_status().json()["id"]
                     for name, dataset in (("home", to_home), ("bob", to_bob), ("inside", linked_inside))}
        ended = {name: wait_for_job(client, job_id, ("succeeded", "failed")) for name, job_id in submitted.items()}
    assert ended["inside"]["status"] == "succeeded", ended["inside"]  # links within the roots are followed
    for name in ("home", "bob"):
        failed = ended[name]
        assert failed["status"] == "failed" and failed["error_code"] == "invalid_dataset", failed
        assert "outside the data roots" in failed["error"]
        for hidden in ("broker.sqlite", "erq.sqlite", str(home), str(data_root / "bob")):
            assert hidden not in failed["error"], (name, failed["error"])
