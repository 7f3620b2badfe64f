"""The chat page's files: every file under server/static is package data (so a wheel carries it), every file the
page links to is there, and the vendored libraries are the ones their checksums name."""

import hashlib
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "mlx_internvl" / "server" / "static"


def test_vendored_files_match_their_checksums():
    lines = (STATIC / "vendor" / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    for name, digest in listed.items():
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
    shipped = {str(p.relative_to(STATIC / "vendor")) for p in (STATIC / "vendor").rglob("*")
               if p.is_file() and p.parent != STATIC / "vendor"}
    assert shipped == set(listed), shipped ^ set(listed)
    for lib in ("marked", "dompurify", "katex"):
        assert f"{lib}/LICENSE" in listed


def test_every_static_file_is_package_data_and_every_link_resolves():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "mlx_internvl.server"]
    packaged = {p for pattern in patterns for p in STATIC.parent.glob(pattern) if p.is_file()}
    assert packaged == {p for p in STATIC.rglob("*") if p.is_file()}
    page = (STATIC / "chat.html").read_text()
    links = re.findall(r'(?:src|href)="static/([^"]+)"', page)
    assert len(links) == 7 and "<script>" not in page and "<style>" not in page  # no inline script or style
    for link in links:
        assert (STATIC / link).is_file(), link
    fonts = re.findall(r"url\((fonts/[^)]+\.woff2)\)", (STATIC / "vendor" / "katex" / "katex.min.css").read_text())
    assert fonts and all((STATIC / "vendor" / "katex" / f).is_file() for f in fonts)
