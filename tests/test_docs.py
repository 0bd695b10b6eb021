"""The README and the documentation: the Python example runs, the README stays short, links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200
FORBIDDEN = ("CARP_SPEC", "shared/")  # files users do not have
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), not images


def python_example() -> str:
    """The README's first ```python block."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def relative_links(path: Path) -> list[str]:
    """Link targets in a Markdown file that point into the repository (no scheme, not a bare #anchor)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)  # code is not links
    targets = LINK.findall(re.sub(r"`[^`\n]*`", "", text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) and not t.startswith("#")]


def slugify(heading: str) -> str:
    """A heading's anchor as MkDocs (Python-Markdown's toc) makes it."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", re.sub(r"`", "", text)).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {slugify(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)}


def test_readme_python_example_runs(tmp_path):
    code = python_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 15, "keep the README example about 10 lines"
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "tensorflow"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the README's Python example failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    scores = re.search(r"\{'top1': ([0-9.]+), 'top5': ([0-9.]+)\}", done.stdout)
    assert scores, f"the example did not print the k-NN scores:\n{done.stdout[-2000:]}"
    assert 0 <= float(scores.group(1)) <= float(scores.group(2)) <= 100


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; the limit is {MAX_README_LINES} (move it to docs/)"


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_references_to_files_users_do_not_have(path):
    text = path.read_text()
    for word in FORBIDDEN:
        assert word not in text, f"{path.relative_to(ROOT)} mentions {word!r}, which users do not have"


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md"])
def test_relative_links_resolve(name):
    path = ROOT / name
    links = relative_links(path)
    for link in links:
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve()
        assert resolved.exists(), f"{name} links to {link}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{name} links to {link}: no heading with that anchor"


def test_every_page_is_in_the_navigation():
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.MULTILINE))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
