"""HTML building blocks of the report page: escaping, number formatting, tables, embedded figures, sections."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from . import viz

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1280px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; margin: .5em 0; }
p.note { color: #555; font-style: italic; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def number(value: Any) -> str:
    """A metric as shown: integers as they are, floats with 4 decimals, missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else esc(value)


def table(headers: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column `numeric_from` on are numbers (right-aligned, 4 decimals)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = ""
    for row in rows:
        cells = [
            f"<td>{esc(v)}</td>" if i < numeric_from else f'<td class="num">{number(v)}</td>' for i, v in enumerate(row)
        ]
        body += "<tr>" + "".join(cells) + "</tr>\n"
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def image(path: Path, alt: str) -> str:
    """The PNG at `path` embedded as a data URI."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def figure(fig, path: Path, alt: str, caption: str = "") -> str:
    """Save a matplotlib figure beside the page and embed it, with an optional caption paragraph."""
    embedded = image(viz.save_png(fig, path), alt)
    return embedded + (f"<p>{caption}</p>" if caption else "")


def section(title: str, body: str) -> str:
    return f"<section>\n<h2>{esc(title)}</h2>\n{body}\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def render_page(title: str, sections: list[str], data: dict) -> str:
    """The whole page: inline CSS, the sections, and the report data as JSON (never executed)."""
    embedded = json.dumps(data).replace("</", "<\\/")
    head = f'<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>'
    script = f'<script type="application/json" id="report-data">{embedded}</script>'
    body = "\n".join([f"<h1>{esc(title)}</h1>", *sections, script])
    return f'<!DOCTYPE html>\n<html lang="en">\n{head}\n<body>\n{body}\n</body>\n</html>\n'
