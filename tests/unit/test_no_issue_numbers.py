"""The code, its tests and the user's documents name no tracker issue numbers.

An issue number means something only while its thread is at hand; in a
docstring or the README it soon points at nothing. The behaviour is said in
words instead, and the history goes to CHANGELOG.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]

#: "issue #13", "Issue 14:", "issues: 15", "(#15)", " #16", "relay #16".
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues?:?\s*#?\d+|(?:^|[\s(\[])#\d+\b", re.MULTILINE)

SUFFIXES = {".py", ".md", ".yaml", ".yml", ".service", ".socket", ".sh", ".toml", ".cfg"}


def checked_files() -> list[Path]:
    files = [CHECKOUT / "README.md", CHECKOUT / "CHANGELOG.md", CHECKOUT / "setup.cfg"]
    for folder in ("relay", "tests", "bench", "deploy", ".ci"):
        for path in sorted((CHECKOUT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path == Path(__file__).resolve():  # its examples are issue numbers
                continue
            # Generated benchmark output is not ours to check; its history is.
            if "results" in path.parts and path.name != "HISTORY.md":
                continue
            if path.suffix in SUFFIXES or path.name in {"Containerfile", "run"}:
                files.append(path)
    return [path for path in files if path.exists()]


def test_the_pattern_finds_the_forms_issue_numbers_took():
    """Every form the tree used to hold is caught; hex colours and anchors are not."""
    for text in ("(issue #13)", "Issue #17: x", "relay #16", "fidelity (#15).", "issue 21"):
        assert ISSUE_NUMBER.search(text), text
    for text in ("color: #fff", "see README.md#tests", "a1#2", "CPU 0 and #"):
        assert not ISSUE_NUMBER.search(text), text


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(CHECKOUT)))
def test_no_issue_number(path: Path):
    """No line of a shipped or checked-in text names an issue by its number."""
    found = [
        f"{path.relative_to(CHECKOUT)}:{text.count(chr(10), 0, match.start()) + 1}: "
        f"{match.group().strip()}"
        for text in [path.read_text(errors="replace")]
        for match in ISSUE_NUMBER.finditer(text)
    ]
    assert not found, found
