"""CHANGELOG.md says what changed in the version relay reports."""

from __future__ import annotations

import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def test_the_newest_changelog_entry_is_this_version():
    """The first version heading of CHANGELOG.md is relay.__version__, and it says
    what changed (at least one entry under it)."""
    init = (CHECKOUT / "relay" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE)
    assert version, "relay/__init__.py has no __version__"
    changelog = (CHECKOUT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (\S+)", changelog, re.MULTILINE)
    assert headings and headings[0] == version.group(1), (headings[:1], version.group(1))
    newest = changelog.split(f"## {headings[0]}", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^- \S", newest, re.MULTILINE), newest


def test_changelog_versions_are_newest_first():
    """Version headings go down: the newest is on top."""
    changelog = (CHECKOUT / "CHANGELOG.md").read_text()
    versions = [
        tuple(int(part) for part in v.split("."))
        for v in re.findall(r"^## (\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    ]
    assert len(versions) >= 2 and versions == sorted(versions, reverse=True), versions
