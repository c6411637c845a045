"""`erq serve`, `erq api` and `erq admin`."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from storage.db import session_scope
from storage.keys import PREFIX_LENGTH, create_key, find_key_to_revoke, has_keys, list_keys, owner_named, revoke_key
from storage.migrate import upgrade
from storage.queue import declare_queue
from storage.settings import LocalFolderError, Settings, get_settings, prepare_local_folders

LOCAL_KEY_NAME = "local"
WORKER_STOP_SECONDS = 10


def _prepare(settings: Settings) -> None:
    try:
        prepare_local_folders(settings)
    except LocalFolderError as exc:
        raise SystemExit(f"erq: error: {exc}") from None
    upgrade(settings.database_url)
    declare_queue(settings)


def _server_args(prog: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


# An idle connection is closed after this long. Clients keep theirs about 5 s (httpx, uvicorn's own
# default): with equal times a client may reuse a connection just as the server closes it, and the
# request fails with a transport error. Longer than the clients', and than a load balancer's 60 s.
KEEP_ALIVE_SECONDS = 75


EXIT_STARTUP_FAILURE = 3  # uvicorn's: the server did not start (the address is in use, ...)


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager's stop) is Ctrl-C here. uvicorn stops gracefully on both and, once
    stopped, raises the signal again: as KeyboardInterrupt it ends `erq api` and `erq serve` through
    their own clean-up (the embedded worker stopped warm), where SIGTERM's default killed the process
    and left that worker running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _run_api(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C. Then event streams end at once with a final `closed` event, and
    other requests get ERQ_API_GRACE_SECONDS to finish before they are cut."""
    import uvicorn

    from service.app import create_app
    from service.events import end_streams

    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # the signal handler, in the event loop's thread
            super().handle_exit(sig, frame)
            try:
                end_streams(getattr(app.state, "event_hub", None))
            except RuntimeError:  # the loop is closed already
                pass

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                   timeout_graceful_shutdown=settings.api_grace_seconds))
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # the signal that stopped the server, raised again by uvicorn
    if not server.started:
        raise SystemExit(EXIT_STARTUP_FAILURE)


def api_main(argv: list[str]) -> int:
    args = _server_args("erq api", argv)
    _stop_on_sigterm()
    settings = get_settings()
    _prepare(settings)
    _run_api(settings, args.host, args.port)
    return 0


def migrate_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="erq migrate", description="Apply the database migrations and exit (every "
                            "erq process also applies them at start, one at a time).").parse_args(argv)
    _prepare(get_settings())
    return 0


def ensure_local_key(settings: Settings) -> None:
    """On a fresh embedded install, create a key and leave it in HOME/api-key for the Quickstart."""
    from storage.private_files import API_KEY_FILE, write_private_file

    key_file = settings.home / API_KEY_FILE
    with session_scope(settings.database_url) as session:
        if has_keys(session):
            return
        raw = create_key(session, LOCAL_KEY_NAME).raw
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.unlink(missing_ok=True)  # left from a database since replaced
    write_private_file(key_file, raw + "\n")
    # The key itself is never printed: server output tends to end up in logs.
    print(f"erq: created an API key for owner {LOCAL_KEY_NAME!r}; read it from {key_file}", flush=True)


def serve_main(argv: list[str]) -> int:
    args = _server_args("erq serve", argv)
    _stop_on_sigterm()
    settings = get_settings()
    _prepare(settings)
    ensure_local_key(settings)
    worker = _embedded_worker() if settings.embedded_broker else None
    if worker is not None:
        worker.start()
    try:
        _run_api(settings, args.host, args.port)
    finally:
        if worker is not None:
            worker.stop()
    if worker is not None and worker.misconfigured:
        print("erq serve: error: the embedded worker cannot start as configured (its reason is above); stopped",
              file=sys.stderr, flush=True)
        return 2
    return 0


def _embedded_worker():
    """The worker beside `erq serve`'s API: started again if it dies, stopped (warm) with the API. One
    that cannot start as configured stops `erq serve` (as Ctrl-C does) instead of failing forever."""
    from worker.keeper import Keeper

    return Keeper("erq serve's worker", [sys.executable, "-m", "erq_cli", "worker"], stop_seconds=WORKER_STOP_SECONDS,
                  on_misconfigured=lambda keeper: os.kill(os.getpid(), signal.SIGINT))


def admin_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erq admin", description="Manage owners, their API keys, webhook "
                                                                   "secrets and data.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create-key", help="add a key for OWNER (created on first use) and print it alone on "
                                           "the last line").add_argument("owner")
    commands.add_parser("list-keys", help="list keys: id, owner, prefix, created, revoked")
    commands.add_parser("revoke-key", help="revoke one key for good").add_argument(
        "key", metavar="KEY_ID_OR_PREFIX", help=f"the key's id or its first {PREFIX_LENGTH} characters")
    commands.add_parser("webhook-secret", help="make a new webhook signing secret for OWNER (replacing its "
                                               "old one) and print it alone on the last line, once").add_argument(
        "owner")
    commands.add_parser("delete-owner-data", help="delete OWNER's ended jobs with their files and its uploads; "
                                                  "its queued and running jobs are asked to cancel (run it again "
                                                  "once they have ended)").add_argument("owner")
    args = parser.parse_args(argv)
    settings = get_settings()
    _prepare(settings)
    if args.command == "delete-owner-data":
        return _delete_owner_data(settings, args.owner)
    with session_scope(settings.database_url) as session:
        if args.command == "create-key":
            return _create_key(session, args.owner)
        if args.command == "list-keys":
            return _list_keys(session)
        if args.command == "webhook-secret":
            return _webhook_secret(session, args.owner, settings)
        return _revoke_key(session, args.key)


def _delete_owner_data(settings: Settings, owner: str) -> int:
    from storage.owner_data import delete_owner_data

    with session_scope(settings.database_url) as session:
        found = owner_named(session, owner)
        owner_id = found.id if found is not None else None
    if owner_id is None:
        print(f"erq admin: error: no owner {owner!r} (see erq admin list-keys)", file=sys.stderr)
        return 2
    deleted = delete_owner_data(settings, owner_id)
    print(f"owner {owner!r}: deleted {deleted.jobs} ended job(s) with their files and {deleted.uploads} upload(s)")
    if deleted.cancelling or deleted.uploads_in_use:
        print(f"{len(deleted.cancelling)} queued or running job(s) were asked to cancel and "
              f"{len(deleted.uploads_in_use)} upload(s) they use were kept: run this again once they have ended")
        return 1
    return 0


def _webhook_secret(session, owner: str, settings: Settings) -> int:
    from storage.webhooks import new_secret

    try:
        secret = new_secret(session, owner, settings)
    except ValueError as exc:
        print(f"erq admin: error: {exc}", file=sys.stderr)
        return 2
    print(f"new webhook secret for owner {owner!r} (its webhooks are signed with it from now on; the old one no "
          "longer verifies); store it now, it is not shown again:")
    print(secret)
    return 0


def _create_key(session, owner: str) -> int:
    try:
        key = create_key(session, owner)
    except ValueError as exc:
        print(f"erq admin: error: {exc}", file=sys.stderr)
        return 2
    print(f"created key {key.id} ({key.prefix}...) for owner {owner!r}; store it now, it is not shown again:")
    print(key.raw)
    return 0


def _list_keys(session) -> int:
    rows = [("id", "owner", "prefix", "created", "revoked")]
    rows += [(str(k.id), k.owner.name, k.prefix or "(none: made before prefixes)",
              k.created_at.isoformat(timespec="seconds"),
              k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-") for k in list_keys(session)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _revoke_key(session, id_or_prefix: str) -> int:
    key = find_key_to_revoke(session, id_or_prefix)
    if key is None:
        hint = (f"; {id_or_prefix!r} is an owner: revoke one of its keys by id or prefix"
                if owner_named(session, id_or_prefix) else "")
        print(f"erq admin: error: no key with id or {PREFIX_LENGTH}-character prefix {id_or_prefix!r}{hint} "
              "(see erq admin list-keys)", file=sys.stderr)
        return 2
    if key.revoked_at is not None:
        print(f"key {key.id} ({key.prefix or 'no prefix'}) of owner {key.owner.name!r} was already revoked")
        return 0
    revoke_key(session, key)
    print(f"revoked key {key.id} ({key.prefix or 'no prefix'}) of owner {key.owner.name!r}")
    return 0
