"""The built documentation as a reader sees it: every page of the MkDocs site rendered by
Debian's headless Chromium (`make docs-deps`), screenshotted, and its rendered DOM checked for
Markdown that did not become structure: a numbered or bulleted item that ended up inside a
paragraph (a list broken by a code block), stray `**` or code fences, images that do not load.
The screenshots are kept in the test's temporary directory for a look."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium (make docs-deps installs Debian's chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    res = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def pages(site: Path) -> list[Path]:
    """The site's pages (MkDocs writes each as <name>/index.html)."""
    return sorted(site.rglob("index.html"))


def chromium(*args: str) -> subprocess.CompletedProcess:
    # As root Chromium needs --no-sandbox; no GPU and no /dev/shm in a test environment.
    return subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
                           "--disable-extensions", "--mute-audio", *args],
                          capture_output=True, text=True, timeout=120)


class Rendered(HTMLParser):
    """Text of paragraphs and list items, outside code, and the images, from Chromium's DOM."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.paragraphs: list[str] = []
        self.text: list[str] = []
        self.images: list[str] = []
        self._p: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        if tag == "p":
            self._p = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass
        if tag == "p" and self._p is not None:
            self.paragraphs.append("".join(self._p))
            self._p = None

    def handle_data(self, data):
        if any(t in ("code", "pre", "script", "style") for t in self.stack):
            if self._p is not None:
                self._p.append("`code`")
            return
        if self._p is not None:
            self._p.append(data)
        self.text.append(data)


def rendered(page: Path) -> Rendered:
    res = chromium("--dump-dom", page.as_uri())
    assert res.returncode == 0 and "</html>" in res.stdout, res.stderr[-2000:]
    doc = Rendered()
    doc.feed(res.stdout)
    return doc


def test_every_page_renders_as_structure(site):
    problems = []
    for page in pages(site):
        doc = rendered(page)
        name = page.relative_to(site)
        for para in doc.paragraphs:
            for line in para.splitlines()[1:]:
                if re.match(r"\s*(\d+\.|[-*+]) \S", line):
                    problems.append(f"{name}: a list item inside a paragraph: {line.strip()!r}")
        text = "".join(doc.text)
        if "**" in text or "```" in text:
            problems.append(f"{name}: Markdown left in the text: "
                            f"{text[max(text.find('**'), text.find('```')) - 40:][:80]!r}")
        for src in doc.images:
            target = (page.parent / src).resolve()
            if not src.startswith(("http:", "https:", "data:")) and not target.is_file():
                problems.append(f"{name}: image {src} does not exist")
    assert len(pages(site)) >= 10
    assert not problems, "\n".join(problems)


def test_screenshots(site, tmp_path):
    from PIL import Image

    for page in pages(site):
        shot = tmp_path / (str(page.relative_to(site).parent).replace("/", "_") + ".png")
        res = chromium("--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
        assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
        image = Image.open(shot).convert("RGB")
        assert image.size == (1280, 2400)
        # The page body (right of the navigation) holds rendered text: many shades, not one.
        body = image.crop((320, 0, 1280, 1200))
        assert len(body.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, shot
    print(f"\nscreenshots in {tmp_path}")
