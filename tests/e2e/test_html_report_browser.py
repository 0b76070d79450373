"""The HTML report of a real run, opened in a real browser (headless Chromium).

The run is the session's smoke run (``smoke_project``, tests/conftest.py: ``python -m harness
run jobs/smoke.yaml`` in a fresh copy of the project); no benchmark is run here. Its parent
run must hold ``report/report.html`` with the stage times, and ``python -m harness report --html`` must write the
same page with the stage times. Each page is checked without a browser (no ``http(s)://``,
no script) and then through Chromium's DOM (``--dump-dom``) of a probe copy: the page with a
script appended that records, once the page has loaded, each image's decoded size
(``naturalWidth``/``naturalHeight``) under the page's own Content-Security-Policy (which
admits ``data:`` images only; the probe's copy also admits its inline script). Read back:
the Table 1 and gallery tables and their row counts, every ``<img>`` a ``data:`` PNG that
PIL decodes to the size the browser decoded, no URL anywhere.

A screenshot of the top of the page (``--screenshot``, 1280 x 1400) is kept in pytest's
temporary folder, ``<basetemp>/html-report0/report.png`` (run with ``-s`` to see the path).
``docs/img/report.png`` is made from it by hand, only when the page changes:

    python -m pytest -q -m slow tests/e2e/test_html_report_browser.py -s
    python -c "from PIL import Image; Image.open('PATH/report.png').convert('RGB')\
        .quantize(128).save('docs/img/report.png', optimize=True)"

Skipped (with the reason) where Chromium is not installed (``apt-get install chromium``;
``.ci/run`` installs it).
"""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from services import user_env

pytestmark = pytest.mark.slow

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(n)), None)
BACKBONES, METHODS, OVERLAYS = ("tiny_vgg", "tiny_resnet"), 8, 4       # jobs/smoke.yaml
PROBE = ("<script>window.addEventListener('load', () => {for (const im of document.images) "
         "{im.setAttribute('data-natural', im.naturalWidth + 'x' + im.naturalHeight)} "
         "document.body.setAttribute('data-probe', 'done')})</script>")
URL = re.compile(r"(?i)https?://")


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--disable-gpu", "--no-sandbox",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


class Dom(HTMLParser):
    """The tables (class -> [[imgs per row] per table]), and every <img>'s attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[int]]] = {}
        self.images: list[dict] = []
        self.body: dict = {}
        self._open: list[tuple[str, list[int]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._open.append((a.get("class", ""), []))
        elif tag == "tr" and self._open:
            self._open[-1][1].append(0)
        elif tag == "img":
            self.images.append(a)
            if self._open and self._open[-1][1]:
                self._open[-1][1][-1] += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._open:
            cls, rows = self._open.pop()
            self.tables.setdefault(cls, []).append(rows)


def in_browser(page: Path) -> Dom:
    """Chromium's DOM of ``page`` with the probe script (module docstring)."""
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and not URL.search(text), page
    csp = "style-src 'unsafe-inline'\""
    assert text.count(csp) == 1, "the page's Content-Security-Policy changed"
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(text.replace(csp, "style-src 'unsafe-inline'; script-src 'unsafe-inline'\"")
                     .replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = chromium("--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Dom(proc.stdout)
    assert dom.body.get("data-probe") == "done", "the page did not finish loading"
    assert not URL.search(proc.stdout)
    return dom


def check_page(dom: Dom) -> None:
    """Table 1 and the gallery of every backbone; every image inlined and decoded."""
    assert [len(rows) for rows in dom.tables["table1"]] == [1 + METHODS] * len(BACKBONES)
    galleries = dom.tables.get("gallery", [])
    assert len(galleries) == len(BACKBONES), "no gallery per backbone"
    for rows in galleries:           # header, then per image: the image and one map a method
        assert rows == [0] + [1 + METHODS] * OVERLAYS, rows
    assert len(dom.tables["worst"]) == len(BACKBONES)
    assert dom.images
    for im in dom.images:
        head, _, payload = im["src"].partition(",")
        assert head == "data:image/png;base64", head[:60]
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as decoded:
            decoded.load()
            assert im.get("data-natural") == f"{decoded.width}x{decoded.height}", im.get("alt")


@pytest.fixture(scope="module")
def pages(request, tmp_path_factory) -> dict:
    """The page the smoke run logged, and the one ``report --html`` writes afterwards."""
    if BROWSER is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    smoke = request.getfixturevalue("smoke_project")
    proc = smoke["proc"]
    assert proc.returncode == 0, f"run jobs/smoke.yaml:\n{proc.stderr[-3000:]}"
    root = smoke["root"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    parent = client.search_runs([exp.experiment_id], "tags.harness_role = 'benchmark'")[0]
    folder = tmp_path_factory.mktemp("html-report")
    logged = Path(client.download_artifacts(parent.info.run_id, "report/report.html",
                                            str(folder)))
    cli = folder / "cli.html"
    done = subprocess.run([sys.executable, "-m", "harness", "report", "--html", str(cli),
                           "--no-log"], cwd=root, env=user_env(smoke["home"]),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"HTML report: {cli}" in done.stdout
    return {"logged": logged, "cli": cli, "folder": folder}


def test_the_run_logs_a_page_that_a_browser_shows_whole(pages):
    dom = in_browser(pages["logged"])
    check_page(dom)
    shortcut = [im for im in dom.images if im.get("alt", "").endswith(": shortcut")]
    assert len(shortcut) == len(BACKBONES) * METHODS       # the quickstart data's cue class
    times = dom.tables.get("times", [])          # logged before the run writes its page
    assert len(times) == 2 and all(len(rows) > 2 for rows in times), times
    size = pages["logged"].stat().st_size
    print(f"\nreport.html of the smoke run: {size / 1e6:.2f} MB, {len(dom.images)} images")
    assert size < 3_000_000, "too large to mail"


def test_report_html_writes_the_page_with_the_stage_times(pages):
    dom = in_browser(pages["cli"])
    check_page(dom)
    times = dom.tables.get("times", [])          # the driver's stages, those in the tasks
    assert len(times) == 2 and all(len(rows) > 2 for rows in times), times
    shot = pages["folder"] / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1280,1400", pages["cli"].as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1400)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "a blank screenshot"
    print(f"\nscreenshot: {shot}")
