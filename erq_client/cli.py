"""`erq submit` and `erq jobs`: the REST API from the command line, through ErqClient.

The job options of `erq submit` are generated from erq_core.config.ErqConfig (the one schema of a
run: names, flags, help, choices and bounds), and are checked against it before anything is sent.
Only the options given are sent: the service fills in the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from erq_client.client import TERMINAL, ErqClient, ErqClientError, Event
from erq_core.config import FieldSpec, check_value
from erq_core.config import fields as config_fields
from erq_core.errors import ConfigError
from erq_core.options import add_config_options

SERVER_VARIABLE = "ERQ_SERVER"
DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_FAILED, EXIT_USAGE = 1, 2
BAR_WIDTH = 30


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get(SERVER_VARIABLE, DEFAULT_SERVER),
                        help=f"the erq API (default: ${SERVER_VARIABLE} or {DEFAULT_SERVER}); the key comes from "
                             "$ERQ_API_KEY")


def job_fields() -> list[FieldSpec]:
    return [spec for spec in config_fields() if spec.option.rest]


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """One option per job parameter of ErqConfig; absent unless given, so the service's defaults apply."""
    group = parser.add_argument_group("job parameters (as `erq quantize`; the service's defaults apply)")
    add_config_options(group, job_fields(), with_defaults=False)


def job_params(args: argparse.Namespace) -> dict[str, Any]:
    """The given job options, checked against ErqConfig's bounds (ConfigError says what to fix)."""
    params = {}
    for spec in job_fields():
        if hasattr(args, spec.name):
            value = getattr(args, spec.name)
            check_value(spec, value)
            params[spec.name] = value
    return params


def _pairs(values: Optional[list[str]], what: str) -> Optional[dict[str, str]]:
    if not values:
        return None
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {value!r} must be KEY=VALUE")
        pairs[key] = item
    return pairs


def submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erq submit", description="Submit a quantization job to an erq service.")
    _server_option(parser)
    add_job_options(parser)
    parser.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="a label for the job (repeatable)")
    parser.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar, then "
                                                             "print its metrics")
    parser.add_argument("--out", metavar="DIR", help="download every file the job published into DIR: the result "
                                                     "folder, and model.onnx, report.html, job.log when the job "
                                                     "made them (implies --wait)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def submit_main(argv: list[str]) -> int:
    parser = submit_parser()
    args = parser.parse_args(argv)
    try:
        params = job_params(args)
        metadata = _pairs(args.metadata, "--metadata")
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"erq submit: error: {exc}\n")
    try:
        with ErqClient(args.server) as client:
            job = submit_uploading(client, params, metadata, quiet=args.quiet)
            print(f"job {job['id']} {job['status']}", flush=True)
            if not (args.wait or args.out):
                return 0
            job = client.wait(job["id"], on_event=None if args.quiet else ProgressBar())
            _print_outcome(job)
            if job["status"] != "succeeded":
                return EXIT_FAILED
            if args.out:
                _print_downloaded(client.download(job["id"], args.out))
            return 0
    except ErqClientError as exc:
        return _fail("erq submit", exc)


# A refusal of these fields that a local path answers: the server cannot read it, so it is uploaded.
UPLOADABLE = {"dataset": ("upload_dataset", ""), "model": ("upload_model", "local-dir:")}


def submit_uploading(client: ErqClient, params: dict[str, Any], metadata: Optional[dict[str, str]],
                     quiet: bool = False) -> dict:
    """Submit the job; if the server refuses its dataset or model and that names a folder or archive
    here, upload it (with a progress bar), name the upload instead and submit again."""
    while True:
        try:
            return client.submit(params, metadata=metadata)
        except ErqClientError as exc:
            local, field = _local_path(exc, params), exc.field
            if local is None:
                raise
        print(f"the server cannot read {local}: uploading it", file=sys.stderr, flush=True)
        upload = getattr(client, UPLOADABLE[field][0])(local, on_progress=None if quiet else UploadBar(local.name))
        print(f"uploaded {local} as {upload['spec']} (sha256 {upload['sha256'][:12]})", file=sys.stderr, flush=True)
        params = {**params, field: upload["spec"]}


def _local_path(exc: ErqClientError, params: dict[str, Any]) -> Optional[Path]:
    if exc.status != 422 or exc.field not in UPLOADABLE:
        return None
    value = str(params.get(exc.field) or "").removeprefix(UPLOADABLE[exc.field][1])
    path = Path(value).expanduser()
    return path if value and path.exists() else None


class UploadBar:
    """An upload's bytes sent, as a one-line bar on stderr."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr

    def __call__(self, sent: int, total: int) -> None:
        share = sent / total if total else 1.0
        filled = int(round(share * BAR_WIDTH))
        self.stream.write(f"\r{self.label[:24]:<24} [{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {100 * share:5.1f}% "
                          f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")
        if sent >= total:
            self.stream.write("\n")
        self.stream.flush()


class ProgressBar:
    """A one-line bar on stderr, redrawn on each progress event of the job's event stream."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.drawn = False

    def __call__(self, event: Event) -> None:
        if event.kind in ("progress", "status"):
            progress = float(event.data.get("progress") or 0.0)
            filled = int(round(progress * BAR_WIDTH))
            stage = event.data.get("stage") or event.data.get("status") or ""
            self.stream.write(f"\r[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {100 * progress:5.1f}% {stage:<24}")
            self.drawn = True
            if event.kind == "status" and event.data.get("status") in TERMINAL:
                self.stream.write("\n")
                self.drawn = False
            self.stream.flush()


def _print_outcome(job: dict) -> None:
    print(f"job {job['id']} {job['status']}")
    if job.get("error"):
        print(f"error: {job['error']}" + (f" [{job['error_code']}]" if job.get("error_code") else ""))
    metrics = job.get("metrics") or {}
    for name in ("fp", "quantized"):
        if isinstance(metrics.get(name), dict):
            figures = ", ".join(f"{k} {v}" for k, v in metrics[name].items() if isinstance(v, (int, float)))
            print(f"{name}: {figures}")


def _fail(prog: str, exc: ErqClientError) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE if exc.status is not None and 400 <= exc.status < 500 else EXIT_FAILED


def jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erq jobs", description="List, show, cancel, delete jobs; read logs; "
                                                                  "download results.")
    common = argparse.ArgumentParser(add_help=False)
    _server_option(common)
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: commands.add_parser(name, parents=[common], **kw)  # noqa: E731
    listing = add("list", help="the owner's jobs, newest first")
    listing.add_argument("--status", action="append", choices=("queued", "running", "succeeded", "failed",
                                                               "cancelled"))
    listing.add_argument("--model")
    listing.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("--json", action="store_true", help="one JSON job per line")
    for name, help_text in (("show", "the job as JSON"), ("cancel", "cancel a queued or running job"),
                            ("delete", "delete an ended job and its files")):
        add(name, help=help_text).add_argument("job_id")
    log = add("log", help="the job's log")
    log.add_argument("job_id")
    log.add_argument("--follow", "-f", action="store_true", help="go on printing until the job ends")
    download = add("download", help="every file a succeeded job published (the result folder and more)")
    download.add_argument("job_id")
    download.add_argument("--out", required=True, metavar="DIR")
    return parser


def jobs_main(argv: list[str]) -> int:
    parser = jobs_parser()
    args = parser.parse_args(argv)
    try:
        with ErqClient(args.server) as client:
            return JOB_COMMANDS[args.command](client, args)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"erq jobs: error: {exc}\n")
    except ErqClientError as exc:
        return _fail(f"erq jobs {args.command}", exc)


def _list(client: ErqClient, args: argparse.Namespace) -> int:
    jobs = []
    for job in client.iter_jobs(status=args.status, model=args.model, metadata=_pairs(args.metadata, "--metadata"),
                                limit=min(args.limit, 100)):
        jobs.append(job)
        if len(jobs) >= args.limit:
            break
    if args.json:
        for job in jobs:
            print(json.dumps(job))
        return 0
    rows = [("id", "status", "progress", "model", "created")]
    rows += [(j["id"], j["status"], f"{100 * j['progress']:.0f}%", j["params"]["model"][-40:],
              j["created_at"][:19]) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _show(client: ErqClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.get(args.job_id), indent=2))
    return 0


def _cancel(client: ErqClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(f"job {job['id']} {job['status']}" + (" (cancel requested)" if job["status"] == "running" else ""))
    return 0


def _delete(client: ErqClient, args: argparse.Namespace) -> int:
    client.delete(args.job_id)
    print(f"job {args.job_id} deleted")
    return 0


def _log(client: ErqClient, args: argparse.Namespace) -> int:
    offset = 0
    while True:
        text, offset, complete = client.log(args.job_id, offset)
        sys.stdout.write(text)
        sys.stdout.flush()
        if complete or not args.follow:
            return 0
        if not text:
            time.sleep(1.0)


def _download(client: ErqClient, args: argparse.Namespace) -> int:
    _print_downloaded(client.download(args.job_id, args.out))
    return 0


def _print_downloaded(paths: dict[str, Path]) -> None:
    """Where each artifact went, then the folder (erq_core.load_quantized reads it)."""
    for name, path in paths.items():
        print(f"downloaded {name} -> {path}")
    folders = {path.parent for path in paths.values()}
    if len(folders) == 1:
        print(f"result folder: {folders.pop()}")


JOB_COMMANDS = {"list": _list, "show": _show, "cancel": _cancel, "delete": _delete, "log": _log,
                "download": _download}


# `erq datasets` and `erq models`: the owner's uploads.
UPLOAD_KINDS = {"datasets": ("dataset", "datasets", "upload_dataset", "dataset", "delete_dataset"),
                "models": ("uploaded model", "models", "upload_model", "uploaded_model", "delete_uploaded_model")}


def uploads_parser(command: str) -> argparse.ArgumentParser:
    what = UPLOAD_KINDS[command][0]
    parser = argparse.ArgumentParser(prog=f"erq {command}", description=f"Upload, list, show and delete the {what}s "
                                     "of your API key's owner.")
    common = argparse.ArgumentParser(add_help=False)
    _server_option(common)
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: commands.add_parser(name, parents=[common], **kw)  # noqa: E731
    listing = add("list", help=f"the {what}s, newest first")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    upload = add("upload", help=f"upload a folder or its .zip/.tar/.tar.gz and print the {what}")
    upload.add_argument("path")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    add("show", help=f"the {what} as JSON").add_argument("id")
    add("delete", help=f"delete the {what} (refused while a queued or running job uses it)").add_argument("id")
    return parser


def datasets_main(argv: list[str]) -> int:
    return _uploads_main("datasets", argv)


def models_main(argv: list[str]) -> int:
    return _uploads_main("models", argv)


def _uploads_main(command: str, argv: list[str]) -> int:
    what, listing, upload, show, delete = UPLOAD_KINDS[command]
    args = uploads_parser(command).parse_args(argv)
    try:
        with ErqClient(args.server) as client:
            if args.command == "upload":
                item = getattr(client, upload)(args.path, on_progress=None if args.quiet else UploadBar(
                    Path(args.path).name))
                print(json.dumps(item, indent=2))
            elif args.command == "show":
                print(json.dumps(getattr(client, show)(args.id), indent=2))
            elif args.command == "delete":
                getattr(client, delete)(args.id)
                print(f"{what} {args.id} deleted")
            else:
                _list_uploads(client, command, args)
            return 0
    except ErqClientError as exc:
        return _fail(f"erq {command} {args.command}", exc)


def _list_uploads(client: ErqClient, command: str, args: argparse.Namespace) -> int:
    page_of = client.datasets if command == "datasets" else client.uploaded_models
    items, after = [], None
    while len(items) < args.limit:
        page = page_of(limit=min(args.limit - len(items), 100), after=after)
        items += page[command]
        if not page["has_more"] or not page[command]:
            break
        after = page[command][-1]["id"]
    if args.json:
        for item in items:
            print(json.dumps(item))
        return 0
    described = (lambda d: f"{d['train_images']} train / {d['val_images']} val, {len(d['classes'])} classes") \
        if command == "datasets" else (lambda m: f"{m['architecture']}, {m['parameters']} parameters")
    rows = [("spec", "size", "contents", "name", "created")]
    rows += [(item["spec"], f"{item['size'] / 1e6:.1f} MB", described(item), item.get("filename") or "-",
              item["created_at"][:19]) for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
