"""The documentation stays navigable and complete: every relative link in README.md and docs/ resolves
(files and #anchors), and the settings table in docs/service.md names exactly the ERQ_* variables the
code reads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from storage.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRODUCT_CODE = ["erq_core", "service", "worker", "storage", "erq_client", "migrations", "erq_cli.py"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
VARIABLE = re.compile(r"\bERQ_[A-Z0-9_]+\b")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_anchor_rule_matches_githubs():
    assert github_anchor("The client: `erq submit`, `erq jobs`, `erq_client`") == "the-client-erq-submit-erq-jobs-erq_client"
    assert github_anchor("Workers on several hosts (artifacts in S3)") == "workers-on-several-hosts-artifacts-in-s3"


def variables_read_by_the_code() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        choices = getattr(field.validation_alias, "choices", None)
        names |= set(choices) if choices else {f"ERQ_{name.upper()}"}
    for entry in PRODUCT_CODE:
        files = [ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py")
        for file in files:
            names |= set(VARIABLE.findall(file.read_text()))
    return names


def settings_table() -> set[str]:
    text = (ROOT / "docs" / "service.md").read_text()
    section = text.split("## Settings (environment)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `ERQ_")]
    return {name for row in rows for name in VARIABLE.findall(row)}


def test_the_settings_table_names_every_variable_the_code_reads_and_no_other():
    read, documented = variables_read_by_the_code(), settings_table()
    assert not read - documented, f"read by the code but not in docs/service.md's settings table: {sorted(read - documented)}"
    assert not documented - read, f"in the settings table but read by no code: {sorted(documented - read)}"
