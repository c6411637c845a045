"""Uploaded datasets and models through the API in process: what is accepted and what it answers,
hostile archives refused with 4xx leaving nothing behind, content addressing, the per-owner quota,
tenancy, and the jobs that name uploads."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage.archives import IMAGE_EXTENSIONS
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE
from tests.upload_archives import (many_files_tar_gz, png, png_claiming, small_dataset, tar_folder, zip_bomb,
                                   zip_folder, zip_of)

ZIP = {"Content-Type": "application/zip"}
TAR = {"Content-Type": "application/x-tar"}
GZIP = {"Content-Type": "application/gzip"}


def post_dataset(client, owner, data: bytes, media: dict = ZIP):
    return client.post("/v1/datasets", content=data, headers={**owner, **media})


def model_parts(folder: Path = FIXTURE_MODEL_DIR, config: bytes | None = None, weights: bytes | None = None) -> dict:
    return {"config": ("config.json", config if config is not None else (folder / "config.json").read_bytes()),
            "weights": ("model.safetensors", weights if weights is not None else
                        (folder / "model.safetensors").read_bytes())}


def stored_files(settings) -> list[Path]:
    """Whatever uploads left in the artifact store and the staging folder."""
    places = [settings.artifact_dir / "uploads", settings.scratch_dir / "uploads"]
    return [p for place in places if place.exists() for p in place.rglob("*") if p.is_file()]


def upload_rows(settings) -> int:
    from sqlalchemy import func, select

    from storage.db import session_scope
    from storage.models import Upload

    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Upload))


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """(settings, client, a key's headers) of one app for the tests of refusals: each leaves nothing,
    so they share it."""
    from storage.migrate import upgrade
    from storage.settings import Settings, prepare_local_folders
    from tests.service.conftest import make_key

    var = tmp_path_factory.mktemp("refusals")
    settings = Settings(home=var, database_url=f"sqlite:///{var / 'erq.sqlite'}",
                        broker_url=f"sqla+sqlite:///{var / 'broker.sqlite'}", data_roots=str(FIXTURE_DATASET))
    prepare_local_folders(settings)
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        yield settings, client, {"Authorization": f"Bearer {make_key(settings, 'mallory')}"}


@pytest.fixture(scope="module")
def fixture_zip(tmp_path_factory) -> bytes:
    """The bundled dataset zipped as `zip -r fmnist16.zip fmnist16/` makes it."""
    return zip_folder(FIXTURE_DATASET, tmp_path_factory.mktemp("zip") / "fmnist16.zip", inside="fmnist16").read_bytes()


def test_the_image_extensions_are_the_engines():
    from erq_core.data import IMAGE_EXTENSIONS as ENGINE

    assert IMAGE_EXTENSIONS == ENGINE


@ON_SQLITE
def test_a_zipped_imagefolder_answers_201_with_its_counts_and_its_sha256(client, alice, fixture_zip):
    answer = post_dataset(client, alice, fixture_zip)
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    splits = {split: sorted(p for p in (FIXTURE_DATASET / split).rglob("*") if p.is_file()) for split in ("train", "val")}
    assert dataset["train_images"] == len(splits["train"]) and dataset["val_images"] == len(splits["val"])
    assert dataset["classes"] == sorted(p.name for p in (FIXTURE_DATASET / "train").iterdir())
    assert dataset["sha256"] == hashlib.sha256(fixture_zip).hexdigest() and dataset["size"] == len(fixture_zip)
    assert dataset["unpacked_size"] == sum(p.stat().st_size for files in splits.values() for p in files)
    assert dataset["spec"] == f"dataset:{dataset['id']}"
    assert answer.headers["location"].endswith(f"/v1/datasets/{dataset['id']}")
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).json() == dataset


@ON_SQLITE
def test_the_same_bytes_again_are_the_same_dataset_whichever_way_they_come(client, alice, settings, fixture_zip):
    first = post_dataset(client, alice, fixture_zip).json()
    again = client.post("/v1/datasets", headers=alice, files={"file": ("fmnist16.zip", fixture_zip, "application/zip")})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert again.json()["filename"] is None  # the first upload's record stands
    assert upload_rows(settings) == 1
    assert len([p for p in stored_files(settings)]) == 1


@ON_SQLITE
def test_tar_and_tar_gz_datasets_with_or_without_a_top_folder(client, alice, tmp_path):
    members = small_dataset(classes=3, per_class=2)
    folder = tmp_path / "ds"
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    for archive, media in ((tar_folder(folder, tmp_path / "a.tar.gz", inside="mydata"), GZIP),
                           (tar_folder(folder, tmp_path / "b.tar", gzip=False), TAR)):
        answer = post_dataset(client, alice, archive.read_bytes(), media)
        assert answer.status_code == 201, answer.text
        assert (answer.json()["train_images"], answer.json()["val_images"]) == (6, 6)
        assert answer.json()["classes"] == ["class0", "class1", "class2"]


@ON_SQLITE
def test_a_listing_pages_newest_first_and_shows_only_the_owners(client, alice, bob):
    made = []
    for value in range(3):
        members = {"train/a/0.png": png(value=value), "train/b/0.png": png(value=value + 100)}
        made.append(post_dataset(client, alice, _zip_bytes(members)).json()["id"])
    first = client.get("/v1/datasets?limit=2", headers=alice).json()
    assert [d["id"] for d in first["datasets"]] == made[::-1][:2] and first["has_more"]
    rest = client.get(f"/v1/datasets?limit=2&cursor={first['next_cursor']}", headers=alice).json()
    assert [d["id"] for d in rest["datasets"]] == [made[0]] and not rest["has_more"]
    after = client.get(f"/v1/datasets?after={made[2]}", headers=alice).json()
    assert [d["id"] for d in after["datasets"]] == made[:2][::-1]
    assert client.get("/v1/datasets", headers=bob).json()["datasets"] == []
    assert client.get("/v1/datasets?cursor=nonsense", headers=alice).status_code == 422


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def _zip_symlink(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train/a/0.png", png())
        info = zipfile.ZipInfo(name)
        info.external_attr = 0o120777 << 16  # S_IFLNK: how `zip --symlinks` stores a link
        archive.writestr(info, target)
    return buffer.getvalue()


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


HOSTILE = {
    "zip path traversal": (lambda: _zip_bytes({"train/a/0.png": png(), "../../evil.png": png()}), ZIP,
                           422, "unsafe_member", "'..'"),
    "tar path traversal": (lambda: _tar_bytes([(tarfile.TarInfo("train/a/../../../etc/x.png"), png())]), TAR,
                           422, "unsafe_member", "'..'"),
    "absolute path": (lambda: _tar_bytes([(tarfile.TarInfo("/etc/cron.d/x.png"), png())]), TAR,
                      422, "unsafe_member", "absolute"),
    "tar symlink": (lambda: _tar_bytes([(tarfile.TarInfo("train/a/0.png"), png()),
                                        (_link("train/a/1.png", "/etc/passwd"), None)]), TAR,
                    422, "unsafe_member", "link"),
    "tar hard link": (lambda: _tar_bytes([(tarfile.TarInfo("train/a/0.png"), png()),
                                          (_link("train/a/1.png", "train/a/0.png", hard=True), None)]), TAR,
                      422, "unsafe_member", "link"),
    "zip symlink": (lambda: _zip_symlink("train/a/1.png", "/etc/passwd"), ZIP, 422, "unsafe_member", "link"),
    "device file": (lambda: _tar_bytes([(tarfile.TarInfo("train/a/0.png"), png()), (_device("train/a/null.png"), None)]),
                    TAR, 422, "unsafe_member", "device"),
    "non-image with an image name": (lambda: _zip_bytes({"train/a/0.png": png(), "train/a/1.png": b"#!/bin/sh\nrm -rf /\n"}),
                                     ZIP, 422, "invalid_image", "train/a/1.png"),
    "non-image file": (lambda: _zip_bytes({"train/a/0.png": png(), "train/a/notes.txt": b"hello"}), ZIP,
                       422, "invalid_image", "notes.txt"),
    "truncated zip": (lambda: _zip_bytes(small_dataset())[:-300], ZIP, 422, "archive_corrupt", "truncated"),
    "truncated tar.gz": (lambda: _gzip(_tar_bytes([(tarfile.TarInfo(n), d) for n, d in small_dataset().items()]))[:-200],
                         GZIP, 422, "archive_corrupt", "truncated"),
    "truncated image": (lambda: _zip_bytes({"train/a/0.png": png(64, 64)[:-40]}), ZIP, 422, "invalid_image", "0.png"),
    "pixel bomb": (lambda: _zip_bytes({"train/a/0.png": png_claiming(30_000, 30_000)}), ZIP,
                   413, "image_too_large", "ERQ_UPLOAD_MAX_IMAGE_PIXELS"),
    "files outside an ImageFolder": (lambda: _zip_bytes({"train/a/0.png": png(), "train/1.png": png()}), ZIP,
                                     422, "invalid_archive", "train/CLASS/IMAGE"),
    "two top folders": (lambda: _zip_bytes({"x/train/a/0.png": png(), "y/train/a/0.png": png()}), ZIP,
                        422, "invalid_archive", "one folder"),
    "no train split": (lambda: _zip_bytes({"val/a/0.png": png()}), ZIP, 422, "invalid_dataset", "train"),
    "val classes differ": (lambda: _zip_bytes({"train/a/0.png": png(), "val/b/0.png": png()}), ZIP,
                           422, "invalid_dataset", "classes"),
    "a name twice": (lambda: _zip_twice(), ZIP, 422, "invalid_archive", "twice"),
    "not an archive": (lambda: b"just some text, not an archive" * 20, ZIP, 422, "invalid_archive", "not a zip"),
    "bzip2 tar": (lambda: b"BZh91AY&SY" + bytes(600), GZIP, 422, "invalid_archive", "zip, tar or tar.gz"),
}


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _zip_twice() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train/a/0.png", png())
        with pytest.warns(UserWarning):
            archive.writestr("train/a/0.png", png(value=3))
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(HOSTILE), ids=lambda c: c.replace(" ", "-"))
def test_a_hostile_archive_is_refused_with_what_to_fix_and_leaves_nothing(refusing, case):
    settings, client, alice = refusing
    make, media, status, code, said = HOSTILE[case]
    answer = post_dataset(client, alice, make(), media)
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code and said in answer.json()["detail"], answer.json()
    assert stored_files(settings) == [] and upload_rows(settings) == 0


@ON_SQLITE
def test_a_zip_bomb_is_refused_at_the_unpacked_limit_before_it_is_expanded(settings, alice, tmp_path):
    """1 GiB of zeros in a 1 MB zip, against a 256 MiB limit."""
    bomb = zip_bomb(tmp_path / "bomb.zip", 1 << 30)
    assert bomb.stat().st_size < 2 << 20 and zipfile.ZipFile(bomb).infolist()[0].file_size == 1 << 30
    limited = settings.model_copy(update={"upload_max_unpacked_bytes": 256 << 20})
    with TestClient(create_app(limited)) as client:
        answer = post_dataset(client, alice, bomb.read_bytes())
    assert answer.status_code == 413 and answer.json()["code"] == "archive_too_large_unpacked"
    assert "ERQ_UPLOAD_MAX_UNPACKED_BYTES" in answer.json()["detail"]
    assert stored_files(settings) == [] and upload_rows(settings) == 0


def test_a_member_that_holds_more_than_its_header_declares_is_refused(refusing, tmp_path):
    """A bomb that lies in its header: the member says 1 MiB and inflates to 64 MiB."""
    settings, client, alice = refusing
    bomb = bytearray(zip_bomb(tmp_path / "liar.zip", 64 << 20).read_bytes())
    for at in (22, bomb.rfind(b"PK\x01\x02") + 24):  # the uncompressed size in the local and central headers
        bomb[at:at + 4] = (1 << 20).to_bytes(4, "little")
    answer = post_dataset(client, alice, bytes(bomb))
    assert answer.status_code == 422 and answer.json()["code"] in ("archive_corrupt", "invalid_image")
    assert stored_files(settings) == [] and upload_rows(settings) == 0


@pytest.mark.integration  # not for the fast lane: reading 65,537 tar headers takes seconds of CPU
def test_a_hundred_thousand_tiny_files_are_refused_at_the_member_limit(refusing, tmp_path):
    settings, client, alice = refusing
    archive = many_files_tar_gz(tmp_path / "many.tar.gz", 100_000)
    answer = post_dataset(client, alice, archive.read_bytes(), GZIP)
    assert answer.status_code == 413 and answer.json()["code"] == "archive_too_many_files"
    assert f"more than {settings.upload_max_files} members (ERQ_UPLOAD_MAX_FILES)" in answer.json()["detail"]
    assert stored_files(settings) == [] and upload_rows(settings) == 0


def test_what_is_not_an_archive_upload_says_how_to_send_one(refusing):
    settings, client, alice = refusing
    answer = client.post("/v1/datasets", content=b"{}", headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code == 415 and "multipart/form-data" in answer.json()["detail"]
    empty = post_dataset(client, alice, b"")
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    form = client.post("/v1/datasets", headers=alice, files={"other": ("x.zip", b"PK")})
    assert form.status_code == 422 and form.json()["field"] == "file"
    assert stored_files(settings) == []


def test_an_upload_over_the_owners_quota_answers_413_with_the_figures_and_keeps_nothing(settings, alice, fixture_zip):
    limited = settings.model_copy(update={"max_upload_bytes_per_owner": len(fixture_zip) + 1000})
    with TestClient(create_app(limited)) as client:
        assert post_dataset(client, alice, fixture_zip).status_code == 201
        other = _zip_bytes(small_dataset())
        answer = post_dataset(client, alice, other)
        assert answer.status_code == 413 and answer.json()["code"] == "upload_quota_exceeded"
        problem = answer.json()
        assert problem["quota_bytes"] == len(fixture_zip) + 1000 and problem["used_bytes"] == len(fixture_zip)
        assert "ERQ_MAX_UPLOAD_BYTES_PER_OWNER" in problem["detail"]
        # Chunked (no Content-Length): refused while it streams, past what is left.
        chunked = client.post("/v1/datasets", content=iter([other[:1000], other[1000:]]), headers={**alice, **ZIP})
        assert chunked.status_code == 413 and chunked.json()["code"] == "upload_quota_exceeded"
        assert upload_rows(settings) == 1 and len(stored_files(settings)) == 1
        # The quota counts stored bytes: deleting one makes room.
        dataset = client.get("/v1/datasets", headers=alice).json()["datasets"][0]["id"]
        assert client.delete(f"/v1/datasets/{dataset}", headers=alice).status_code == 204
        assert post_dataset(client, alice, other).status_code == 201


def test_another_owner_sees_and_uses_none_of_it(client, alice, bob, fixture_zip):
    dataset = post_dataset(client, alice, fixture_zip).json()["id"]
    model = client.post("/v1/models", headers=alice, files=model_parts()).json()["id"]
    assert client.get(f"/v1/datasets/{dataset}", headers=bob).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset}", headers=bob).status_code == 404
    assert client.get(f"/v1/models/{model}", headers=bob).status_code == 404
    assert client.get("/v1/models/uploads", headers=bob).json()["models"] == []
    job = client.post("/v1/jobs", headers=bob, json={"model": "deit_tiny", "dataset": f"dataset:{dataset}"})
    assert job.status_code == 404 and job.json()["code"] == "upload_not_found" and job.json()["field"] == "dataset"
    job = client.post("/v1/jobs", headers=bob, json={"model": f"upload:{model}", "dataset": str(FIXTURE_DATASET)})
    assert job.status_code == 404 and job.json()["field"] == "model"
    # Bob's own copy of the same bytes is his own dataset.
    mine = post_dataset(client, bob, fixture_zip)
    assert mine.status_code == 201 and mine.json()["id"] != dataset


def test_a_job_names_uploads_and_an_upload_in_use_cannot_be_deleted(client, alice, fixture_zip, settings):
    dataset = post_dataset(client, alice, fixture_zip).json()
    model = client.post("/v1/models", headers=alice, files=model_parts()).json()
    job = client.post("/v1/jobs", headers=alice, json={"model": model["spec"], "dataset": dataset["spec"]})
    assert job.status_code == 202, job.text
    assert job.json()["params"]["dataset"] == dataset["spec"] and job.json()["params"]["model"] == model["spec"]
    renewed = client.get(f"/v1/datasets/{dataset['id']}", headers=alice).json()
    assert renewed["last_used_at"] >= dataset["last_used_at"]
    for path in (f"/v1/datasets/{dataset['id']}", f"/v1/models/{model['id']}"):
        refused = client.delete(path, headers=alice)
        assert refused.status_code == 409 and refused.json()["jobs"] == [job.json()["id"]]
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=alice).json()["status"] == "cancelled"
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    assert client.delete(f"/v1/models/{model['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 404
    assert stored_files(settings) == []


@ON_SQLITE
def test_a_job_on_a_train_only_dataset_must_not_evaluate_and_must_fit_its_calibration(client, alice):
    dataset = post_dataset(client, alice, _zip_bytes(small_dataset(classes=2, per_class=5, val=False))).json()
    assert dataset["val_images"] == 0 and dataset["train_images"] == 10
    job = {"model": "deit_tiny", "dataset": dataset["spec"]}
    refused = client.post("/v1/jobs", headers=alice, json=job)
    assert refused.status_code == 422 and "evaluate false" in refused.json()["detail"]
    too_many = client.post("/v1/jobs", headers=alice, json={**job, "evaluate": False, "calib_size": 32})
    assert too_many.status_code == 422 and too_many.json()["field"] == "calib_size"
    assert client.post("/v1/jobs", headers=alice, json={**job, "evaluate": False, "calib_size": 8}).status_code == 202


@ON_SQLITE
def test_a_model_uploads_as_two_parts_or_as_an_archive_and_is_one_model(client, alice, tmp_path):
    from safetensors import safe_open

    answer = client.post("/v1/models", headers=alice, files=model_parts())
    assert answer.status_code == 201, answer.text
    model = answer.json()
    with safe_open(str(FIXTURE_MODEL_DIR / "model.safetensors"), "np") as weights:  # an independent count
        parameters = sum(weights.get_tensor(name).size for name in weights.keys())
    assert (model["architecture"], model["num_classes"], model["parameters"]) == ("vit_tiny_patch16_224", 10,
                                                                                  parameters)
    assert model["spec"] == f"upload:{model['id']}" and model["filename"] == "model.safetensors"
    for archive, media in ((zip_folder(FIXTURE_MODEL_DIR, tmp_path / "m.zip", inside="fmnist_vit"), ZIP),
                           (tar_folder(FIXTURE_MODEL_DIR, tmp_path / "m.tar.gz"), GZIP)):
        again = client.post("/v1/models", content=archive.read_bytes(), headers={**alice, **media})
        assert again.status_code == 200 and again.json()["id"] == model["id"]
    listed = client.get("/v1/models/uploads", headers=alice).json()["models"]
    assert [m["id"] for m in listed] == [model["id"]]
    assert any(m["kind"] == "upload" and m["allowed"] for m in client.get("/v1/models", headers=alice).json())


def _config(**changes) -> bytes:
    config = json.loads((FIXTURE_MODEL_DIR / "config.json").read_bytes())
    config.update(changes)
    return json.dumps(config).encode()


def _safetensors(tensors: dict[str, tuple[str, list[int]]], data_bytes: int | None = None) -> bytes:
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2}
    for name, (dtype, shape) in tensors.items():
        length = sizes[dtype] * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + bytes(offset if data_bytes is None else data_bytes)


BAD_MODELS = {
    "pickled weights": ({"weights": pickle.dumps({"head.weight": [0.0] * 10}, protocol=2)}, "pickle_refused", "pickle"),
    "truncated weights": ({"weights": (FIXTURE_MODEL_DIR / "model.safetensors").read_bytes()[:-1000]}, "invalid_model",
                          "truncated"),
    "overlapping tensors": ({"weights": _safetensors({"a": ("F32", [4]), "b": ("F32", [4])}, data_bytes=16)},
                            "invalid_model", "model.safetensors"),
    "unknown dtype": ({"weights": b"\x1c\0\0\0\0\0\0\0" + b'{"a":{"dtype":"Q9","shape":[1]' + b"}}"}, "invalid_model",
                      "model.safetensors"),
    "unsupported architecture": ({"config": _config(architecture="resnet50")}, "unsupported_architecture", "resnet50"),
    "config without architecture": ({"config": b'{"num_classes": 10}'}, "invalid_model", "architecture"),
    "config not json": ({"config": b"architecture: vit"}, "invalid_model", "not JSON"),
    "weights of another head": ({"config": _config(num_classes=1000)}, "invalid_model", "num_classes"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS), ids=lambda c: c.replace(" ", "-"))
def test_a_bad_model_is_refused_with_what_to_fix_and_leaves_nothing(refusing, case):
    settings, client, alice = refusing
    parts, code, said = BAD_MODELS[case]
    answer = client.post("/v1/models", headers=alice, files=model_parts(**parts))
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == code and said in answer.json()["detail"], answer.json()
    assert stored_files(settings) == [] and upload_rows(settings) == 0


def test_a_model_archive_with_a_pickle_is_refused(refusing, tmp_path):
    settings, client, alice = refusing
    archive = zip_of({"config.json": (FIXTURE_MODEL_DIR / "config.json").read_bytes(),
                      "model.safetensors": (FIXTURE_MODEL_DIR / "model.safetensors").read_bytes(),
                      "pytorch_model.bin": pickle.dumps({})}, tmp_path / "m.zip")
    answer = client.post("/v1/models", content=archive.read_bytes(), headers={**alice, **ZIP})
    assert answer.status_code == 422 and answer.json()["code"] == "pickle_refused"
    only_config = zip_of({"config.json": (FIXTURE_MODEL_DIR / "config.json").read_bytes()}, tmp_path / "c.zip")
    answer = client.post("/v1/models", content=only_config.read_bytes(), headers={**alice, **ZIP})
    assert answer.status_code == 422 and "model.safetensors" in answer.json()["detail"]
    assert stored_files(settings) == [] and upload_rows(settings) == 0


@ON_SQLITE
def test_model_uploads_follow_erq_allowed_models(settings, alice):
    closed = settings.model_copy(update={"allowed_models": "@aliases"})
    with TestClient(create_app(closed)) as client:
        answer = client.post("/v1/models", headers=alice, files=model_parts())
        assert answer.status_code == 403 and "upload:*" in answer.json()["detail"]


@ON_SQLITE
def test_an_upload_is_not_held_to_the_64_kib_request_limit_and_other_routes_still_are(client, alice, fixture_zip):
    assert len(fixture_zip) > 64 * 1024
    assert post_dataset(client, alice, fixture_zip).status_code == 201
    big = client.post("/v1/jobs", content=b"{" + b" " * (65 * 1024) + b"}",
                      headers={**alice, "Content-Type": "application/json"})
    assert big.status_code == 413
