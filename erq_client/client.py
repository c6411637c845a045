"""ErqClient: submit, follow (Server-Sent Events), list, cancel, delete, logs and downloads; upload
datasets and models."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

import httpx

API_KEY_VARIABLE = "ERQ_API_KEY"
TERMINAL = ("succeeded", "failed", "cancelled")
RECONNECTS = 20  # an event stream that drops is resumed (Last-Event-ID) this many times in a row


class ErqClientError(Exception):
    """An error answer of the API (an RFC 9457 problem), or no answer at all (`status` None)."""

    def __init__(self, detail: str, status: Optional[int] = None, code: Optional[str] = None,
                 field: Optional[str] = None):
        super().__init__(detail)
        self.detail, self.status, self.code, self.field = detail, status, code, field

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.detail}{where}" + (f" [{self.code}]" if self.code else "")


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: `kind` status, progress or log; `data` its JSON."""

    id: Optional[str]
    kind: str
    data: dict[str, Any]


class ErqClient:
    def __init__(self, server: str, api_key: Optional[str] = None, timeout: float = 30.0,
                 transport: Optional[httpx.BaseTransport] = None):
        api_key = api_key or os.environ.get(API_KEY_VARIABLE)
        if not api_key:
            raise ErqClientError(f"no API key: set {API_KEY_VARIABLE} (an administrator makes one with "
                                 "`erq admin create-key OWNER`)")
        self.http = httpx.Client(base_url=server.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}", "User-Agent": "erq-client/1"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "ErqClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            answer = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ErqClientError(f"cannot reach {self.http.base_url}: {exc}") from None
        _raise_for_problem(answer)
        return answer

    # Jobs.
    def submit(self, params: dict[str, Any], metadata: Optional[dict[str, str]] = None,
               webhook: Optional[dict[str, Any]] = None, idempotency_key: Optional[str] = None) -> dict:
        body = {**params, **({"metadata": metadata} if metadata else {}), **({"webhook": webhook} if webhook else {})}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, status: Optional[list[str] | str] = None, model: Optional[str] = None,
             metadata: Optional[dict[str, str]] = None, limit: int = 20, after: Optional[str] = None,
             created_after: Optional[str] = None, created_before: Optional[str] = None) -> dict:
        """One page: {jobs, has_more, next_cursor}."""
        params: list[tuple[str, Any]] = [("limit", limit)]
        params += [("status", s) for s in ([status] if isinstance(status, str) else status or [])]
        params += [(name, value) for name, value in (("model", model), ("after", after),
                                                     ("created_after", created_after),
                                                     ("created_before", created_before)) if value is not None]
        params += [(f"metadata[{key}]", value) for key, value in (metadata or {}).items()]
        return self._request("GET", "/v1/jobs", params=params).json()

    def iter_jobs(self, **filters) -> Iterator[dict]:
        """Every job matching the filters, newest first, page after page."""
        after = None
        while True:
            page = self.list(**filters, after=after)
            yield from page["jobs"]
            if not page["has_more"] or not page["jobs"]:
                return
            after = page["jobs"][-1]["id"]

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def log(self, job_id: str, offset: Optional[int] = None) -> tuple[str, int, bool]:
        """(text from `offset`, the next offset, whether the log is complete)."""
        answer = self._request("GET", f"/v1/jobs/{job_id}/log", params={"offset": offset or 0})
        return answer.text, int(answer.headers["Erq-Next-Offset"]), answer.headers["Erq-Log-Complete"] == "true"

    # Following.
    def events(self, job_id: str, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """The job's events until its terminal status; a dropped stream is resumed where it stopped, and
        one refused for a while (429: the owner's streams are all open; 503) is asked again after its
        Retry-After."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.http.timeout.connect, read=60)) as answer:
                    if answer.status_code in (429, 503) and failures < RECONNECTS:  # too many streams, busy
                        answer.read()
                        failures += 1
                        time.sleep(_retry_after(answer))
                        continue
                    if answer.status_code >= 400:
                        answer.read()
                        _raise_for_problem(answer)
                    for event in _parse_events(answer.iter_lines()):
                        failures = 0
                        last_event_id = event.id or last_event_id
                        yield event
                        if event.kind == "status" and event.data.get("status") in TERMINAL:
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ErqClientError(f"the event stream of job {job_id} keeps dropping: {exc}") from None
                time.sleep(min(5.0, 0.5 * failures))

    def wait(self, job_id: str, on_event: Optional[Callable[[Event], None]] = None) -> dict:
        """Follow the job to its end; returns the ended job."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
        return self.get(job_id)

    # Results.
    def download(self, job_id: str, out: str | os.PathLike) -> dict[str, Path]:
        """Every artifact a succeeded job published (the result folder that erq_core.load_quantized
        reads, and model.onnx, report.html, job.log, ... when the job made them) into `out`, each
        checked against the sha256 the job lists; returns where each went, by name."""
        out = Path(out)
        job = self.get(job_id)
        if job["status"] != "succeeded":
            raise ErqClientError(f"job {job_id} is {job['status']}: only a succeeded job has a result folder "
                                 "(its log: erq jobs log)", 409, "no_result")
        out.mkdir(parents=True, exist_ok=True)
        return {artifact["name"]: self._download_artifact(job_id, artifact, out) for artifact in job["artifacts"]}

    def _download_artifact(self, job_id: str, artifact: dict, out: Path) -> Path:
        """One artifact, streamed into a temporary file beside its place, checked, then moved there (a
        redirect to the artifact store is followed; the key is not sent to another origin)."""
        name, target = artifact["name"], out / artifact["name"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise ErqClientError(f"job {job_id} lists an artifact named {name!r}, which is not a file name")
        handle = tempfile.NamedTemporaryFile(dir=out, prefix=f".{name}.", delete=False)
        try:
            path = f"/v1/jobs/{quote(job_id, safe='')}/artifacts/{quote(name, safe='')}"  # the key goes to this server
            with handle, self.http.stream("GET", path, follow_redirects=True,
                                          timeout=httpx.Timeout(self.http.timeout.connect, read=300)) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    _raise_for_problem(answer)
                for block in answer.iter_bytes(1 << 20):
                    handle.write(block)
            if _sha256(Path(handle.name)) != artifact["sha256"]:
                raise ErqClientError(f"{name} of job {job_id} does not match its sha256; download again")
            os.replace(handle.name, target)
        except httpx.TransportError as exc:
            raise ErqClientError(f"the download of {name} of job {job_id} broke off: {exc}") from None
        finally:
            Path(handle.name).unlink(missing_ok=True)
        return target

    # Uploads.
    def upload_dataset(self, path: str | os.PathLike, on_progress: Optional[Progress] = None) -> dict:
        """Upload an ImageFolder (a folder with train/ and val/, or its .zip/.tar/.tar.gz) and return the
        dataset: a job names it as its `spec` (`dataset:ID`). The same bytes again answer the same dataset."""
        return self._upload("/v1/datasets", Path(path), on_progress)

    def upload_model(self, path: str | os.PathLike, on_progress: Optional[Progress] = None) -> dict:
        """Upload a timm folder (config.json + model.safetensors, or its archive) and return the model:
        a job names it as its `spec` (`upload:ID`)."""
        return self._upload("/v1/models", Path(path), on_progress)

    def _upload(self, route: str, path: Path, on_progress: Optional[Progress]) -> dict:
        if not path.exists():
            raise ErqClientError(f"{path} does not exist")
        with tempfile.TemporaryDirectory(prefix="erq-upload-") as scratch:
            archive = pack_folder(path, Path(scratch) / f"{path.name}.tar") if path.is_dir() else path
            size = archive.stat().st_size
            headers = {"Content-Type": ARCHIVE_TYPES.get(_archive_suffix(archive), "application/octet-stream"),
                       "Content-Length": str(size), "X-Filename": path.name}
            answer = self._request("POST", route, content=_read_in_blocks(archive, size, on_progress),
                                   headers=headers, timeout=httpx.Timeout(self.http.timeout.connect, read=600,
                                                                          write=600, pool=60))
        return answer.json()

    def datasets(self, limit: int = 20, after: Optional[str] = None) -> dict:
        """One page of the owner's datasets: {datasets, has_more, next_cursor}."""
        return self._request("GET", "/v1/datasets", params=_page(limit, after)).json()

    def dataset(self, dataset_id: str) -> dict:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def uploaded_models(self, limit: int = 20, after: Optional[str] = None) -> dict:
        """One page of the owner's uploaded models: {models, has_more, next_cursor}."""
        return self._request("GET", "/v1/models/uploads", params=_page(limit, after)).json()

    def uploaded_model(self, model_id: str) -> dict:
        return self._request("GET", f"/v1/models/{model_id}").json()

    def delete_uploaded_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{model_id}")


Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)
ARCHIVE_TYPES = {".zip": "application/zip", ".tar": "application/x-tar", ".tar.gz": "application/gzip",
                 ".tgz": "application/gzip"}
BLOCK = 1 << 20


def _archive_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((suffix for suffix in ARCHIVE_TYPES if name.endswith(suffix)), path.suffix.lower())


def _page(limit: int, after: Optional[str]) -> dict[str, Any]:
    return {"limit": limit, **({"after": after} if after else {})}


def pack_folder(folder: Path, out: Path) -> Path:
    """A tar of the folder's files (hidden ones left out) in a fixed order with fixed metadata: the same
    files give the same bytes, so uploading a folder again finds the upload made before."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as archive:
        for root, folders, files in os.walk(folder):
            folders[:] = sorted(name for name in folders if not name.startswith("."))
            for name in sorted(files):
                path = Path(root) / name
                if name.startswith(".") or not path.is_file():
                    continue
                info = tarfile.TarInfo(path.relative_to(folder).as_posix())
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
    return out


def _read_in_blocks(path: Path, size: int, on_progress: Optional[Progress]) -> Iterator[bytes]:
    sent = 0
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            sent += len(block)
            yield block
            if on_progress is not None:
                on_progress(sent, size)


def _retry_after(answer: httpx.Response, most: float = 30.0) -> float:
    """The answer's Retry-After in seconds (1 when it has none), at most `most`."""
    try:
        return min(most, max(1.0, float(answer.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _raise_for_problem(answer: httpx.Response) -> None:
    if answer.status_code < 400:
        return
    try:
        problem = answer.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    detail = problem.get("detail") or f"HTTP {answer.status_code}"
    raise ErqClientError(str(detail), answer.status_code, problem.get("code"), problem.get("field"))


def _parse_events(lines: Iterator[str]) -> Iterator[Event]:
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":") and ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value[1:] if value.startswith(" ") else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
