"""The report as a document: sections of text, tables and images, rendered to markdown (``report.md``) and to one
self-contained HTML page (``index.html``: inline CSS, images embedded as ``data:`` URIs, no scripts, no network), so
the page reads the same offline, from a copied folder or from a download of an S3 prefix."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field

import pandas as pd

from uda_ray.analysis.summary import PERCENT_SUFFIX, to_markdown
from uda_ray.results import store


@dataclass(frozen=True)
class Text:
    text: str
    kind: str = "p"  # "p" | "note" (a warning the reader must see)


@dataclass(frozen=True)
class Table:
    df: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class Image:
    uri: str  # a PNG written under the report folder (or any readable URI)
    caption: str = ""


Block = Text | Table | Image


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _relative(uri: str, out_dir: str) -> str:
    """The link from ``report.md`` in ``out_dir`` to ``uri``: relative for two local paths (the plots beside it, the
    trials' grids in ``../trial_<id>/images``), so the folder reads the same when copied; the URI otherwise."""
    if "://" in uri or "://" in out_dir:
        prefix = out_dir.rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    return os.path.relpath(os.path.abspath(uri), os.path.abspath(out_dir)).replace(os.sep, "/")


def to_markdown_text(title: str, sections: list[Section], out_dir: str) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"{'#' * s.level} {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                lines += [f"**{b.text}**" if b.kind == "note" else b.text, ""]
            elif isinstance(b, Table):
                lines += ([b.caption, ""] if b.caption else []) + [to_markdown(b.df), ""]
            else:
                lines += [f"![{b.caption}]({_relative(b.uri, out_dir)})", ""]
                if b.caption:
                    lines += [f"*{b.caption}*", ""]
    return "\n".join(lines)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.long { max-width: 420px; word-break: break-all; font-family: ui-monospace, monospace; font-size: 12px; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 6px 10px; }
figure { margin: 0.8em 0 1.4em; } figure img { max-width: 100%; border: 1px solid #e0e0e0; }
figcaption { color: #555; font-size: 13px; }
"""


def _cell_html(value: object, percent: bool) -> tuple[str, str]:
    if isinstance(value, float):
        if value != value:  # NaN
            return "", "num"
        return (f"{value:.2f}" if percent else f"{value:.4g}"), "num"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value), "num"
    if value is None or value is pd.NA or value is pd.NaT:
        return "", ""
    text = str(value)
    return html.escape(text), "long" if len(text) > 40 else ""


def _table_html(df: pd.DataFrame) -> str:
    percent = [str(c).endswith(PERCENT_SUFFIX) for c in df.columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False, name=None):
        cells = []
        for v, p in zip(row, percent):
            text, cls = _cell_html(v, p)
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _image_html(uri: str, caption: str) -> str:
    data = base64.b64encode(store.read_bytes(uri)).decode("ascii")
    alt = html.escape(caption or uri.rpartition("/")[2])
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'


def to_html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page of the document."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for i, s in enumerate(sections):
        body.append(f'<h{s.level} id="s{i}">{html.escape(s.title)}</h{s.level}>')
        for b in s.blocks:
            if isinstance(b, Text):
                cls = ' class="note"' if b.kind == "note" else ""
                body.append(f"<p{cls}>{html.escape(b.text)}</p>")
            elif isinstance(b, Table):
                if b.caption:
                    body.append(f"<p>{html.escape(b.caption)}</p>")
                body.append(_table_html(b.df))
            else:
                body.append(_image_html(b.uri, b.caption))
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections)
                  if s.level == 2)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>{body[0]}<nav><ul>{toc}</ul></nav>{''.join(body[1:])}"
            "</body></html>\n")
