"""The web console: `GET /ui/` serves the page, `/ui/FILE` its modules and styles (service/ui/, plain
files: no build step, nothing from a CDN); `/` and `/ui` lead to it. Every call the page makes is to
the REST API with the key the user pasted, which the browser keeps for the session only."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.problems import Problem

UI_FOLDER = Path(__file__).resolve().parent.parent / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page's own files only. Inline styles are for report.html, shown in a sandboxed frame; downloads
# may follow a redirect to a bucket's presigned URL (ERQ_S3_DOWNLOAD=redirect).
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
          "frame-src blob:; connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; "
          "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/ui")
def console_entry() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)  # relative: right behind a proxy that adds a prefix too


@router.get("/ui/")
def console_page() -> FileResponse:
    return console_file("index.html")


@router.get("/ui/{name}")
def console_file(name: str) -> FileResponse:
    path = UI_FOLDER / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise Problem(404, "not_found", f"the console has no file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
