"""The console's files as the API serves them: from the package, nothing from elsewhere, under a
content security policy that allows this origin's scripts only (the browser test: test_console.py)."""
from __future__ import annotations

import re

import pytest

from service.routes.ui import UI_FOLDER

FILES = sorted(p.name for p in UI_FOLDER.iterdir())


def test_the_console_is_plain_files_that_load_nothing_from_another_origin():
    assert {"index.html", "app.js", "api.js", "form.js", "dom.js", "style.css"} <= set(FILES)
    for name in FILES:
        text = (UI_FOLDER / name).read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), f"{name} loads from another origin"
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), f"{name} imports from another origin"
        assert "@import" not in text and "url(http" not in text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_api_serves_the_console_at_ui_and_leads_there_from_the_root(client):
    for entry in ("/", "/ui"):
        answer = client.get(entry, follow_redirects=False)
        assert answer.status_code == 307 and answer.headers["location"] == "ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name in FILES:
        served = client.get(f"/ui/{name}")
        assert served.status_code == 200 and served.content == (UI_FOLDER / name).read_bytes()
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    for missing in ("/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/.hidden.js"):
        assert client.get(missing).status_code == 404
    assert "/ui/" not in client.get("/openapi.json").json()["paths"]  # pages, not API routes
