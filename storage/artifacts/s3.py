"""The S3 artifact store (ERQ_ARTIFACT_URL=s3://BUCKET/PREFIX): AWS S3 or any S3-compatible server
(MinIO, Ceph, SeaweedFS) at ERQ_S3_ENDPOINT_URL, with the credentials of the usual AWS variables.

Objects are `PREFIX/JOB/attempt-N/NAME`. A run writes into a scratch folder on its worker's host
(ERQ_SCRATCH_DIR/JOB/attempt-N), then uploads each file (in parts of ERQ_S3_MULTIPART_MB above that
size), its sha256 as object metadata, and verifies what the bucket holds (size, sha256, and the
server's CRC32 where it keeps one) before the run may record the job's end.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError, \
    EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from storage.artifacts.download import ArtifactGone, ByteRange, Download, DownloadRequest, RangeNotSatisfiable, \
    RangeRequest
from storage.artifacts.interface import ArtifactStore, ArtifactStoreError, StoredFile
from storage.artifacts.names import LOG_NAME, media_type
from storage.settings import Settings

MiB = 1 << 20
SHA256_KEY = "sha256"  # object metadata: x-amz-meta-sha256
MISSING = ("404", "NoSuchKey", "NotFound")
MISSING_BUCKET = ("404", "NoSuchBucket", "NotFound")
DENIED = ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")
# Refused, timed out, or dropped before an answer: the endpoint is not an S3 server that is up.
UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
WRITE_CHECK_NAME = ".erq-write-check-"
S3_ERRORS = (BotoCoreError, ClientError, Boto3Error, OSError)
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)", re.ASCII)
CHUNK = MiB


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ('bucket', 'some/prefix')."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def make_client(endpoint_url: Optional[str], for_checks: bool = False):
    """A client for AWS S3 (no endpoint) or a server at `endpoint_url` (path-style addressing: no
    wildcard DNS needed). Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID, ...).

    `for_checks`: short timeouts and a single attempt, so a readiness probe or a worker's start-up
    check answers within seconds when the endpoint is down (the default client retries for minutes)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if for_checks:
        patience = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}
    else:
        patience = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 5, "mode": "standard"}}
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"} if endpoint_url else None,
                    **patience)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config,
                                          region_name=region or ("us-east-1" if endpoint_url else None))


@dataclass(frozen=True)
class LocalDigest:
    size: int
    sha256: str
    crc32: str  # base64 of the big-endian CRC32, as S3 reports ChecksumCRC32


def local_digest(path: Path) -> LocalDigest:
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            sha.update(block)
            crc = zlib.crc32(block, crc)
            size += len(block)
    return LocalDigest(size, sha.hexdigest(), base64.b64encode(crc.to_bytes(4, "big")).decode())


def error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


class S3Store(ArtifactStore):
    def __init__(self, url: str, scratch: Path, endpoint_url: Optional[str] = None,
                 public_endpoint_url: Optional[str] = None, multipart_mb: int = 64, presign_seconds: int = 300):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.scratch = Path(scratch)
        self.endpoint_url = endpoint_url
        self.client = make_client(endpoint_url)
        self._check_client = None  # made on the first check(): the API and workers need it once or per probe
        public = public_endpoint_url or endpoint_url
        # Presigned URLs are signed for the host clients reach, which may not be the one workers use.
        self.presigner = self.client if public == endpoint_url else make_client(public)
        self.transfer = TransferConfig(multipart_threshold=multipart_mb * MiB, multipart_chunksize=multipart_mb * MiB)
        self.presign_seconds = presign_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Store":
        return cls(settings.artifact_url, settings.scratch_dir, settings.s3_endpoint_url,
                   settings.s3_public_endpoint_url, settings.s3_multipart_mb, settings.s3_presign_seconds)

    def key(self, job_id: str, run: Optional[str], name: str = "") -> str:
        return "/".join(part for part in (self.prefix, job_id, run, name) if part)

    def describe(self) -> str:
        return self.url

    def check(self, write: bool = False) -> None:
        if self._check_client is None:
            self._check_client = make_client(self.endpoint_url, for_checks=True)
        try:
            self._check_client.head_bucket(Bucket=self.bucket)
        except S3_ERRORS as exc:
            raise ArtifactStoreError(self._explain(exc, f"read the bucket '{self.bucket}'")) from exc
        if write:
            self._check_write(self._check_client)

    def _check_write(self, client) -> None:
        """Put, then delete, a small object under the prefix (runs store and retention removes files)."""
        key = "/".join(part for part in (self.prefix, f"{WRITE_CHECK_NAME}{uuid.uuid4().hex}") if part)
        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
        except S3_ERRORS as exc:
            raise ArtifactStoreError(self._explain(exc, f"write the object s3://{self.bucket}/{key}")) from exc
        try:
            client.delete_object(Bucket=self.bucket, Key=key)
        except S3_ERRORS as exc:
            raise ArtifactStoreError(self._explain(exc, f"delete the object s3://{self.bucket}/{key}")) from exc

    def _explain(self, exc: BaseException, action: str) -> str:
        """What went wrong with the bucket, and which setting to look at."""
        endpoint = self.endpoint_url or "AWS S3"
        code = error_code(exc)
        if code in MISSING_BUCKET:
            return (f"the bucket '{self.bucket}' does not exist at {endpoint} (create it, or correct the bucket "
                    "of ERQ_ARTIFACT_URL)")
        if code in DENIED:
            return (f"access denied: cannot {action} at {endpoint} ({code}; check the "
                    "AWS credentials, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and what they may do)")
        if isinstance(exc, NoCredentialsError):
            return ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or an "
                    "instance role)")
        if isinstance(exc, UNREACHABLE):
            return (f"cannot reach the S3 endpoint {endpoint}: {exc} (check ERQ_S3_ENDPOINT_URL and that the "
                    "server is up)")
        return f"cannot {action} at {endpoint}: {exc}"

    def workspace(self, job_id: str, run: str) -> Path:
        return self.scratch / job_id / run

    def release_workspace(self, job_id: str, run: str) -> None:
        shutil.rmtree(self.workspace(job_id, run), ignore_errors=True)
        try:
            (self.scratch / job_id).rmdir()
        except OSError:
            pass  # another run of the job is still there

    def store_run(self, job_id: str, run: str, folder: Path, names: Iterable[str]) -> list[StoredFile]:
        present = [name for name in names if (folder / name).is_file()]
        # The log last: a stored log means the results before it were stored.
        return [self._upload(folder / name, self.key(job_id, run, name))
                for name in sorted(present, key=lambda name: name == LOG_NAME)]

    def _upload(self, path: Path, key: str) -> StoredFile:
        digest = local_digest(path)
        where = f"s3://{self.bucket}/{key}"
        try:
            self.client.upload_file(str(path), self.bucket, key, Config=self.transfer,
                                    ExtraArgs={"Metadata": {SHA256_KEY: digest.sha256},
                                               "ContentType": media_type(path.name)})
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot store {path.name} as {where}: {exc}") from exc
        self.verify(key, digest)
        return StoredFile(name=path.name, size=digest.size, sha256=digest.sha256)

    def verify(self, key: str, digest: LocalDigest) -> None:
        """Raise ArtifactStoreError unless the object `key` holds the bytes `digest` describes: its
        size, its sha256 metadata, and its full-object CRC32 where the server keeps one."""
        where = f"s3://{self.bucket}/{key}"
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot check {where} after its upload: {exc}") from exc
        problems = []
        if head.get("ContentLength") != digest.size:
            problems.append(f"{head.get('ContentLength')} bytes stored, {digest.size} written")
        if head.get("Metadata", {}).get(SHA256_KEY) != digest.sha256:
            problems.append("its sha256 metadata differs from the file's")
        stored_crc = head.get("ChecksumCRC32")
        if stored_crc and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and stored_crc != digest.crc32:
            problems.append(f"the server's CRC32 {stored_crc} differs from the file's {digest.crc32}")
        if problems:
            raise ArtifactStoreError(f"{where} does not hold what the run wrote: {'; '.join(problems)}")

    def sync_log(self, job_id: str, run: str, folder: Path) -> None:
        path = folder / LOG_NAME
        if path.is_file():
            self.client.upload_file(str(path), self.bucket, self.key(job_id, run, LOG_NAME),
                                    ExtraArgs={"ContentType": media_type(LOG_NAME)})

    def read_text(self, job_id: str, run: Optional[str], name: str) -> Optional[str]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, run, name))["Body"]
            with body:
                return body.read().decode(errors="replace")
        except ClientError as exc:
            if error_code(exc) in MISSING:
                return None
            raise ArtifactStoreError(f"cannot read {name} of job {job_id} from {self.url}: {exc}") from exc
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot read {name} of job {job_id} from {self.url}: {exc}") from exc

    def read_range(self, job_id: str, run: Optional[str], name: str, offset: int = 0,
                   limit: Optional[int] = None) -> Optional[tuple[bytes, int]]:
        end = "" if limit is None else str(offset + limit - 1)
        try:
            answer = self.get(job_id, run, name, f"bytes={offset}-{end}")
            with answer["Body"] as body:
                data = body.read()
            total = answer.get("ContentRange", "").rpartition("/")[2]
            return data, int(total) if total.isdigit() else offset + len(data)
        except ClientError as exc:
            if error_code(exc) in MISSING:
                return None
            if error_code(exc) == "InvalidRange":  # offset at or past the end
                found = self.head(job_id, run, name)
                return None if found is None else (b"", int(found["ContentLength"]))
            raise ArtifactStoreError(f"cannot read {name} of job {job_id} from {self.url}: {exc}") from exc
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot read {name} of job {job_id} from {self.url}: {exc}") from exc

    def head(self, job_id: str, run: Optional[str], name: str) -> Optional[dict[str, Any]]:
        """The object's headers, None when it is gone."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, run, name))
        except ClientError as exc:
            if error_code(exc) in MISSING:
                return None
            raise

    def get(self, job_id: str, run: Optional[str], name: str, byte_range: Optional[str] = None) -> dict[str, Any]:
        """get_object, with an HTTP Range header's value when given (raises ClientError: NoSuchKey,
        InvalidRange)."""
        extra = {"Range": byte_range} if byte_range else {}
        return self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, run, name), **extra)

    def presigned_url(self, job_id: str, run: Optional[str], name: str) -> str:
        """A GET URL valid ERQ_S3_PRESIGN_SECONDS that needs no credentials (Range works on it)."""
        return self.presigner.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_seconds,
            Params={"Bucket": self.bucket, "Key": self.key(job_id, run, name),
                    "ResponseContentDisposition": f'attachment; filename="{name}"',
                    "ResponseContentType": media_type(name)})

    def download(self, job_id: str, run: Optional[str], name: str, request: DownloadRequest) -> Download:
        """HEAD and redirects read the object's headers (a gone object answers here rather than at the
        bucket); a stream asks the bucket for the range itself."""
        where = f"s3://{self.bucket}/{self.key(job_id, run, name)}"
        try:
            if request.headers_only or request.redirect:
                head = self.head(job_id, run, name)
                if head is None:
                    raise ArtifactGone(where)
                size = int(head["ContentLength"])
                if request.headers_only:
                    return Download(size)
                return Download(size, url=self.presigned_url(job_id, run, name))
            return self._stream(job_id, run, name, request.range, where)
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot read {where}: {exc}") from exc

    def _stream(self, job_id: str, run: Optional[str], name: str, wanted: Optional[RangeRequest],
                where: str) -> Download:
        try:
            answer = self.get(job_id, run, name, wanted.header() if wanted else None)
        except ClientError as exc:
            if error_code(exc) in MISSING:
                raise ArtifactGone(where) from None
            if error_code(exc) == "InvalidRange":  # it starts at or past the end
                head = self.head(job_id, run, name)
                if head is None:
                    raise ArtifactGone(where) from None
                raise RangeNotSatisfiable(int(head["ContentLength"])) from None
            raise
        sent = CONTENT_RANGE.fullmatch(answer.get("ContentRange") or "")
        if sent is None:
            return Download(int(answer["ContentLength"]), chunks=_chunks(answer["Body"]))
        start, end, size = (int(number) for number in sent.groups())
        return Download(size, ByteRange(start, end), chunks=_chunks(answer["Body"]))

    def remove_other_runs(self, job_id: str, keep: str) -> None:
        kept = self.key(job_id, keep) + "/"
        self._delete([key for key in self._keys(self.key(job_id, None) + "/") if not key.startswith(kept)])

    def remove_job(self, job_id: str) -> None:
        self._delete(list(self._keys(self.key(job_id, None) + "/")))

    def _keys(self, prefix: str) -> Iterable[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _delete(self, keys: list[str]) -> None:
        """Delete `keys`; ArtifactStoreError when the bucket refuses any of them. A bulk delete reports
        refusals per key in its answer instead of raising: those must not pass as deleted."""
        for start in range(0, len(keys), 1000):
            try:
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise ArtifactStoreError(f"cannot delete from s3://{self.bucket}: {exc}") from None
            refused = answer.get("Errors") or []
            if refused:
                first = refused[0]
                raise ArtifactStoreError(f"s3://{self.bucket} refused to delete {len(refused)} file(s), for example "
                                         f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())


def _chunks(body) -> Iterator[bytes]:
    with body:
        yield from body.iter_chunks(CHUNK)


def remove_stale_scratch(scratch: Path, older_than_seconds: float) -> int:
    """Remove the scratch folders of runs that cannot still be running (a worker killed mid-run
    leaves its folder behind); returns how many went. A run's folder changes at least when it
    starts, and no run lasts longer than ERQ_MAX_JOB_SECONDS (plus a grace)."""
    removed, cutoff = 0, time.time() - older_than_seconds
    for folder in scratch.glob("*/attempt-*"):
        try:
            stale = folder.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
            try:
                folder.parent.rmdir()
            except OSError:
                pass
    return removed
