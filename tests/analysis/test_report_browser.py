"""The HTML report as a reader sees it: headless Chromium loads ``report/index.html`` from a copied folder, and
the page shows the tables, the plots and the best trials' prediction grids (checked in the DOM after load and in a
screenshot that holds the grids' Cityscapes colours).

Chromium is Debian's ``chromium`` package; ``.ci/run`` installs it when missing and sets
``UDA_RAY_REQUIRE_BROWSER=1``, which turns a missing browser into a failure instead of a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from analysis_fixtures import write_search
from PIL import Image

from tests.conftest import tiny_overrides
from uda_ray.analysis import analyze
from uda_ray.config import Config, apply_overrides
from uda_ray.data.labels import CLASSES
from uda_ray.results import store
from uda_ray.train.images import colorize
from uda_ray.train.loop import fit

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found is None:
        if os.environ.get("UDA_RAY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"UDA_RAY_REQUIRE_BROWSER=1 but none of {', '.join(BROWSERS)} is on PATH")
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}); .ci/run installs Debian's chromium")
    return found


def _chromium(browser: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # no background networking: on a closed network Chromium's update, sync and QUIC connections only wait and fail
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--disable-quic", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={cwd / 'profile'}"]
    return subprocess.run([browser, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=180,
                          check=True)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> Path:
    """A search's results folder whose best trials carry real prediction grids (from a tiny run), analysed, then
    the report folder alone copied elsewhere."""
    root = tmp_path_factory.mktemp("browser")
    exp = Path(write_search(root))
    run = root / "run"
    cfg = apply_overrides(Config(), tiny_overrides(synthetic_cache))
    fit(cfg, work_dir=run)
    best = store.load_trials(str(exp)).query("status == 'TERMINATED'").sort_values("score").trial_id.iloc[-1]
    shutil.copytree(run / "images", Path(store.trial_images_uri(str(exp), best)))
    analyze(str(exp), top=5)
    # report.md links every figure relative to itself: the plots beside it, the grids in ../trial_<id>/images
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (exp / "report" / "report.md").read_text())
    assert any(link.startswith("../trial_") for link in links)
    assert all((exp / "report" / link).is_file() for link in links), links
    copied = root / "elsewhere" / "report"
    shutil.copytree(exp / "report", copied)
    return copied / "index.html"


def test_the_page_shows_tables_plots_and_grids(report_page: Path) -> None:
    browser = _browser()
    dom = _chromium(browser, "--dump-dom", report_page.as_uri(), cwd=report_page.parent).stdout
    assert "<table" in dom and "Parameter importance" in dom and "Prediction grids of the best trials" in dom
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', dom)
    assert len(images) >= 6, images
    assert sum("iter 0000003" in a or "iter 0000006" in a for a in images) == 2  # the best trial's two grids
    assert "file://" not in dom.split("<body", 1)[1]  # nothing points back to the original folder


def test_the_screenshot_is_the_report_not_a_blank_page(report_page: Path, tmp_path: Path) -> None:
    browser = _browser()
    shot = tmp_path / "page.png"
    _chromium(browser, f"--screenshot={shot}", "--window-size=1280,6000", report_page.as_uri(), cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels[:: max(1, len(pixels) // 200_000)]}
    assert len(colours) > 100, "the screenshot is (nearly) one colour: the page did not render"
    # the grids' ground truth and predictions are areas in the Cityscapes palette (its greys left out: text and
    # plots have greys); without the grids the plots and tables show at most 2 of these colours, with them 13
    palette = [c for c in colorize(np.arange(len(CLASSES), dtype=np.uint8)[None])[0] if not c[0] == c[1] == c[2]]
    areas = [int((pixels == c).all(axis=1).sum()) for c in palette]
    assert sum(a > 50 for a in areas) >= 6, f"no prediction grid is visible in the screenshot: {areas}"


def test_full_page_screenshot_holds_the_whole_page(report_page: Path, tmp_path: Path) -> None:
    """docs/screenshot.py (how README's docs/report.png is made): one capture of the whole page, from the title to
    the last prediction grid at its end, cut below the page's last row."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "docs" / "screenshot.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    browser = _browser()
    out = tmp_path / "report.png"
    width, height = shot.full_page(report_page, out, width=1000, height=12000, exe=browser)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape[:2] == (height, width) and 1500 < height < 12000 - shot.MARGIN
    assert shot.page_end(pixels) == height - 1 - shot.MARGIN  # cut just below the page's last drawn row
    palette = [c for c in colorize(np.arange(len(CLASSES), dtype=np.uint8)[None])[0] if not c[0] == c[1] == c[2]]
    bottom = pixels[int(0.8 * height):].reshape(-1, 3)
    assert sum(int((bottom == c).all(axis=1).sum()) > 50 for c in palette) >= 4, "the page's end (grids) is cut"
    # --colors 64, as docs/report.png is kept: the same page in a palette of at most 64 colours
    small = tmp_path / "small.png"
    assert shot.full_page(report_page, small, width=1000, height=12000, colors=64, exe=browser) == (width, height)
    kept = Image.open(small)
    assert kept.mode == "P" and len(kept.getcolors()) <= 64 and small.stat().st_size < out.stat().st_size
    with pytest.raises(RuntimeError, match="taller than"):
        shot.full_page(report_page, tmp_path / "short.png", width=1000, height=800, exe=browser)
