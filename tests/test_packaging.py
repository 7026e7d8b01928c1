"""Release bookkeeping: one version in pyproject.toml, ``ptfast.__version__`` and CHANGELOG.md; the licence."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import ptfast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_version_matches_pyproject() -> None:
    assert ptfast.__version__ == _project()["version"]


def test_changelog_has_a_section_for_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+[^\]\s]*)\]? [—-] (\d{4}-\d{2}-\d{2})$", text, flags=re.M)
    assert versions, "CHANGELOG.md: no '## X.Y.Z — YYYY-MM-DD' section"
    assert ptfast.__version__ in [v for v, _ in versions], f"CHANGELOG.md has no section for {ptfast.__version__}"
    # Newest first.
    assert versions[0][0] == ptfast.__version__, f"CHANGELOG.md's newest section is {versions[0][0]}"


def test_licence_is_bsd_3_clause() -> None:
    project = _project()
    assert project["license"] == "BSD-3-Clause"
    assert project.get("license-files") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the ptfast authors" in text
