"""The report in a real browser: headless Chromium loads it with no error, every image
decodes, and the one-screen summary is what a screenshot of the first screen shows.

The run directory is fabricated in the server's exact format with real metric values
(fabricated_run.py). Chromium is driven from the command line only (stdlib subprocess):
a copy of the report gets a small checker script (the report itself has none) that
records error events and console.error calls from the start, and on load writes a JSON
verdict into the DOM, which ``--dump-dom`` prints. Screenshots use ``--screenshot``.

Skipped only where no Chromium is installed. Install it (Debian): ``apt-get install -y
chromium`` (.ci/run does). Set MEDGEN_SCREENSHOTS=DIR to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fabricated_run import make_run
from PIL import Image

from medgen.evaluation.report import write_report
from medgen.evaluation.report_compare import render_comparison

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium: install it with `apt-get install -y chromium` (Debian; .ci/run does)")

CHECKER = """<script>
window.__medgenErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__medgenErrors.push(String(e.message || ('failed to load ' + (t.tagName || '') + ' ' + (t.alt || ''))));
}, true);
var __err = console.error;
console.error = function () { window.__medgenErrors.push(Array.from(arguments).join(' ')); __err.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var samples = document.getElementById('samples');
  var out = document.createElement('pre');
  out.id = 'medgen-check';
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
    errors: window.__medgenErrors, height: document.documentElement.scrollHeight,
    summary_bottom: samples ? samples.getBoundingClientRect().top : 0});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--hide-scrollbars", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("browser"), n=12)
    return write_report(run)


def check_in_browser(page: Path, tmp_path: Path) -> dict:
    html = page.read_text()
    checked = tmp_path / f"check-{page.name}"
    checked.write_text(html.replace("<head>", "<head>" + CHECKER, 1))
    result = chromium("--virtual-time-budget=15000", "--dump-dom", checked.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="medgen-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the checker never ran (chromium exit {result.returncode}):\n{result.stderr[-2000:]}"
    verdict = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                         .replace("&amp;", "&"))
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]
    return verdict


def screenshot(page: Path, path: Path, width: int, height: int, tmp_path: Path) -> np.ndarray:
    result = chromium(f"--window-size={width},{height}", f"--screenshot={path}", page.as_uri(),
                      profile=tmp_path / "profile-shot")
    assert path.exists(), result.stderr[-2000:]
    keep = os.environ.get("MEDGEN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_report_loads_without_errors_every_image_decodes_and_the_summary_fits_one_screen(report, tmp_path):
    verdict = check_in_browser(report, tmp_path)
    assert verdict["errors"] == [], verdict["errors"]
    assert verdict["broken"] == [], f"images that did not decode: {verdict['broken']}"
    assert verdict["images"] >= 4                     # latest grid, its zoom, and collapsed older grids
    assert verdict["summary_bottom"] <= 1100, "the summary no longer fits one screen"
    first = screenshot(report, tmp_path / "report-summary.png", 1200, 900, tmp_path)
    assert first.std() > 10                           # a page with content, not a blank frame
    whole = screenshot(report, tmp_path / "report-full.png", 1200, min(int(verdict["height"]), 12000), tmp_path)
    dark_rows = (whole < 60).mean(axis=1)             # the sample grids' black backgrounds
    assert dark_rows.max() > 0.3, "no sample grid visible in the full-page screenshot"


def test_run_comparison_loads_without_errors(report, tmp_path):
    page = tmp_path / "compare.html"
    page.write_text(render_comparison([report.parent, report.parent]))
    verdict = check_in_browser(page, tmp_path)
    assert verdict["errors"] == [] and verdict["broken"] == []
    assert verdict["images"] == 2
