"""A worker's cache of uploads (worker/upload_cache.py): fetched once by sha256 whoever asks at the
same time, least recently used evicted within its bound, never an entry a job is using, and
pruned once the upload is gone."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from storage.archives import Limits
from storage.models import UploadKind
from storage.upload_store import FolderUploads
from tests.upload_archives import png, small_dataset, zip_of
from worker.upload_cache import UploadCache, UploadFetchError, Wanted

LIMITS = Limits(max_unpacked_bytes=1 << 30, max_files=1000, max_image_pixels=10**7)


def stored_dataset(store: FolderUploads, tmp_path: Path, value: int = 0, owner: int = 1) -> Wanted:
    """A small dataset archive put in the store as an upload would be; what the cache is asked for."""
    members = {name: png(value=value + i) for i, name in enumerate(small_dataset(classes=2, per_class=2))}
    archive = zip_of(members, tmp_path / f"dataset-{value}.zip")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    store.put(owner, sha256, archive)
    return Wanted(owner, sha256, UploadKind.DATASET, sum(map(len, members.values())), f"dataset:d{value}")


def _use_and_report(folder: str, store_root: str, wanted: Wanted, start, results) -> None:
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("erq").addHandler(handler)
    logging.getLogger("erq").setLevel(logging.INFO)
    cache = UploadCache(Path(folder), 1 << 30, FolderUploads(Path(store_root)), LIMITS, wait_seconds=60)
    start.wait(30)
    with cache.use(wanted) as entry:
        files = sorted(str(p.relative_to(entry)) for p in entry.rglob("*.png"))
    results.put((os.getpid(), sum("fetching" in r for r in records), files))


def test_two_processes_asking_at_once_fetch_an_upload_once_and_both_use_it(tmp_path):
    store = FolderUploads(tmp_path / "artifacts")
    wanted = stored_dataset(store, tmp_path)
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_use_and_report, args=(str(tmp_path / "cache"), str(tmp_path / "artifacts"),
                                                               wanted, start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    assert sum(fetches for _, fetches, _ in reports) == 1
    expected = sorted(n for n in small_dataset(classes=2, per_class=2))
    assert [files for _, _, files in reports] == [expected, expected]
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_the_least_recently_used_entry_goes_first_and_one_in_use_never(tmp_path):
    store = FolderUploads(tmp_path / "artifacts")
    wanted = [stored_dataset(store, tmp_path, value) for value in (0, 10, 20)]
    bound = 2 * max(item.unpacked_size for item in wanted)  # room for two entries, not three
    cache = UploadCache(tmp_path / "cache", bound, store, LIMITS, wait_seconds=10)
    with cache.use(wanted[0]) as in_use:
        with cache.use(wanted[1]):
            pass
        os.utime(in_use, (1, 1))  # the oldest of all: would go first, were it not in use
        with cache.use(wanted[2]):
            assert in_use.is_dir() and (in_use / "train").is_dir()
        assert not cache.entry(wanted[1].sha256).exists(), "the least recently used entry not in use goes"
    assert sorted(sha for _, sha, _ in cache.entries()) == sorted([wanted[0].sha256, wanted[2].sha256])
    assert sum(size for _, _, size in cache.entries()) <= bound


def test_an_archive_changed_in_the_store_is_refused_not_used(tmp_path):
    store = FolderUploads(tmp_path / "artifacts")
    wanted = stored_dataset(store, tmp_path)
    store.path(wanted.owner_id, wanted.sha256).write_bytes(zip_of({"train/a/0.png": png()}, tmp_path / "x.zip")
                                                           .read_bytes())
    cache = UploadCache(tmp_path / "cache", 1 << 30, store, LIMITS, wait_seconds=10)
    with pytest.raises(UploadFetchError, match="does not match its sha256"):
        with cache.use(wanted):
            pass
    assert cache.entries() == [] and not list((tmp_path / "cache").glob(".tmp-*"))


def test_an_archive_gone_from_the_store_fails_the_job_with_what_happened(tmp_path):
    from erq_core.errors import DatasetError

    store = FolderUploads(tmp_path / "artifacts")
    wanted = stored_dataset(store, tmp_path)
    store.remove(wanted.owner_id, wanted.sha256)
    with pytest.raises(DatasetError, match="no longer in the artifact store"):
        with UploadCache(tmp_path / "cache", 1 << 30, store, LIMITS, wait_seconds=10).use(wanted):
            pass


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_jobs_uploads_become_local_folders_and_entries_of_deleted_uploads_are_pruned(client, alice, settings):
    from storage.db import session_scope
    from storage import jobs
    from tests.fixture_paths import FIXTURE_MODEL_DIR
    from tests.upload_archives import zip_folder
    from worker.upload_cache import localized, prune

    dataset = client.post("/v1/datasets", content=zip_of(small_dataset(), settings.home / "d.zip").read_bytes(),
                          headers={**alice, "Content-Type": "application/zip"}).json()
    model = client.post("/v1/models", headers={**alice, "Content-Type": "application/zip"},
                        content=zip_folder(FIXTURE_MODEL_DIR, settings.home / "m.zip").read_bytes()).json()
    job = client.post("/v1/jobs", headers=alice, json={"model": model["spec"], "dataset": dataset["spec"],
                                                       "calib_size": 2}).json()
    with localized(job["id"], job["params"], settings) as local:
        assert local["dataset"] == str(settings.upload_cache_dir / dataset["sha256"])
        assert sorted(p.name for p in Path(local["dataset"]).iterdir()) == ["train", "val"]
        folder = Path(local["model"].removeprefix("local-dir:"))
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert (folder / "model.safetensors").read_bytes() == (FIXTURE_MODEL_DIR / "model.safetensors").read_bytes()
        assert local["w_bits"] == job["params"]["w_bits"]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    assert prune(settings) == [dataset["sha256"]]
    assert not (settings.upload_cache_dir / dataset["sha256"]).exists()
    assert (settings.upload_cache_dir / model["sha256"]).is_dir()
    with session_scope(settings.database_url) as session:
        assert jobs.job_for_owner(session, job["id"], 1) is not None
