"""The web pages' files (mom_service/ui): in the wheel, the vendored library as published, no inline script or
style, no secret."""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "mom_service" / "ui"
VENDOR = UI / "static" / "vendor"


def package_data() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns: list[str] = pyproject["tool"]["setuptools"]["package-data"]["mom_service.ui"]
    return patterns


def test_every_file_of_the_pages_is_package_data() -> None:
    """A file no pattern names would be missing from the wheel, and so from the Docker image (`pip install .`)."""
    patterns = package_data()
    files = [p.relative_to(UI).as_posix() for p in UI.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "playground.html" in files and "static/vendor/chart.umd.min.js" in files
    left_out = [f for f in files if f != "__init__.py" and not any(fnmatch(f, p) for p in patterns)]
    assert left_out == []


def test_the_vendored_chart_js_is_the_published_file_of_its_readme() -> None:
    readme = (VENDOR / "README.md").read_text()
    (sha256,) = re.findall(r"`chart.umd.min.js`: sha256 `([0-9a-f]{64})`", readme)
    script = (VENDOR / "chart.umd.min.js").read_bytes()
    assert hashlib.sha256(script).hexdigest() == sha256
    (version,) = re.findall(r"\| \[Chart.js\]\([^)]*\) \| ([0-9.]+) \|", readme)
    assert script.startswith(b"/*!\n * Chart.js v" + version.encode() + b"\n")
    assert f"chart.js@{version}" in readme
    assert "MIT License" in (VENDOR / "chart.js-LICENSE.md").read_text()


def test_the_pages_have_no_inline_script_or_style() -> None:
    """The Content-Security-Policy allows scripts and styles from files of this origin only: an inline one would
    be blocked, so none may be written."""
    for page in UI.glob("*.html"):
        html = page.read_text()
        assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", html) == [], page.name
        assert "<style" not in html and " style=" not in html and " on" + "click=" not in html, page.name
        assert re.findall(r'(?:src|href)="(?!/ui[/"])[^"#]*"', html) == [], page.name  # nothing from elsewhere


def test_the_scripts_never_write_html() -> None:
    """Text from the service (answers, names, errors) is set as text, never parsed as HTML."""
    for script in (UI / "static").glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{script.name} uses {sink}"
