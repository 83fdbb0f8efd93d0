"""A full-page screenshot of an experiment's HTML report, as README's docs/report.png:

    python docs/screenshot.py results/demo-<time> docs/report.png      # needs Debian's chromium

Headless Chromium's ``--screenshot`` captures the window, not the page, so the page is drawn in a window taller than
it and the empty rows below its end are cut off. A page that reaches the bottom of the window is an error (never a
cropped image): raise ``--height``. One capture of the whole page, so no section is cut or drawn over another.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MARGIN = 24  # rows of background kept below the page's last drawn row


def browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def chromium(exe: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Headless Chromium without background networking (on a closed network its update, sync and QUIC connections
    only wait and fail)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--disable-quic", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={cwd / 'profile'}"]
    return subprocess.run([exe, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=True)


def page_end(pixels: np.ndarray) -> int:
    """Index of the last row that differs from the page background (the colour of the bottom-left pixel)."""
    drawn = (pixels != pixels[-1, 0]).any(axis=(1, 2))
    return int(np.flatnonzero(drawn)[-1]) if drawn.any() else -1


def full_page(html: Path, png: Path, *, width: int = 1000, height: int = 16000, colors: int | None = None,
              exe: str | None = None) -> tuple[int, int]:
    """Screenshot of the whole page ``html`` into ``png`` (``width`` pixels wide, as tall as the page); returns its
    size. ``colors``: save with a palette of that many colours (a quarter of the file size at 64, for a capture
    kept in the repository). Raises ``RuntimeError`` when the page is taller than ``height``."""
    exe = exe or browser()
    if exe is None:
        raise RuntimeError(f"no headless browser ({', '.join(BROWSERS)}) on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="uda-ray-shot-") as work:
        raw = Path(work) / "window.png"
        chromium(exe, f"--screenshot={raw}", f"--window-size={width},{height}", Path(html).resolve().as_uri(),
                 cwd=Path(work))
        pixels = np.asarray(Image.open(raw).convert("RGB"))
    end = page_end(pixels)
    if end >= pixels.shape[0] - MARGIN:
        raise RuntimeError(f"{html}: the page is taller than the {pixels.shape[0]}-pixel window: pass a larger height")
    page = Image.fromarray(pixels[:end + 1 + MARGIN])
    if colors is not None:
        page = page.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    png.parent.mkdir(parents=True, exist_ok=True)
    page.save(png, optimize=True)
    return page.size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", type=Path, help="experiment folder holding report/index.html (uda-ray analyze)")
    p.add_argument("out", type=Path, help="the PNG to write, e.g. docs/report.png")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--height", type=int, default=16000, help="window height: at least the page's")
    p.add_argument("--colors", type=int, help="save with a palette of this many colours (smaller file), e.g. 64")
    args = p.parse_args(argv)
    html = args.experiment / "report" / "index.html"
    if not html.is_file():
        print(f"{html}: not found; run `uda-ray analyze {args.experiment}` first", file=sys.stderr)
        return 2
    w, h = full_page(html, args.out, width=args.width, height=args.height, colors=args.colors)
    print(f"wrote {args.out} ({w}x{h}, the whole page of {html})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
