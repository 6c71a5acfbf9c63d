"""`index.html` beside a report's `index.md`: one self-contained page, readable offline.

The page is the report's Markdown rendered (headings, paragraphs, tables, lists, code), every PNG it
links embedded as base64 (no file beside it needed), and the accuracy-diversity frontier's points
(`frontier.json`) as a table under its plot. Rendering the Markdown the report already writes keeps
one source: a table or plot added to `index.md` appears in the page without touching this module.
Only the Markdown the report writes is understood; anything else is shown as text, escaped.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#1d232b}
table{border-collapse:collapse;margin:10px 0 18px}th,td{border:1px solid #d5d9de;padding:4px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f5}img{max-width:100%;border:1px solid #eceef1}
code{background:#f0f2f5;padding:0 3px;border-radius:3px}h2{margin-top:28px;border-bottom:1px solid #eceef1}"""
IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")


def write_html(index_md: Path) -> Path:
    """Render `index_md` (and the PNGs and frontier.json beside it) to `index.html` in the same folder,
    written under a temporary name and renamed into place; returns its path."""
    folder = index_md.parent
    lines = index_md.read_text().splitlines()
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), "mhr report")
    body = render(lines, folder) + frontier_table(folder / "frontier.json")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")
    out = folder / "index.html"
    tmp = folder / ".index.html.tmp"
    tmp.write_text(page)
    tmp.replace(out)
    return out


def render(lines: list[str], folder: Path) -> str:
    """The report's Markdown as HTML; images linked by relative path are embedded."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(f"<pre>{html.escape(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
            continue
        heading = re.match(r"^(#{1,4}) (.*)$", line)
        image = IMAGE.match(line.strip())
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            out.append(_image(image.group("alt"), image.group("src"), folder))
        elif line.startswith(("- ", "* ")):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    rows = [r for r in rows if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]  # the --- separator
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(alt: str, src: str, folder: Path) -> str:
    path = folder / src
    if "://" in src or not path.is_file() or path.suffix.lower() != ".png":
        return f"<p>[{html.escape(alt)}: {html.escape(src)} not found]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def frontier_table(path: Path) -> str:
    """frontier.json ({variant: [(λ, NDCG@10, H@10), …]}) as a table; "" when absent."""
    if not path.is_file():
        return ""
    curves = json.loads(path.read_text())
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{lam:g}</td><td>{100 * ndcg:.2f}</td><td>{ent:.3f}</td></tr>"
                   for label, pts in curves.items() for lam, ndcg, ent in sorted(pts))
    return ("<h2>Accuracy-diversity frontier: the points</h2><table><thead><tr><th>variant</th><th>λ</th>"
            f"<th>NDCG@10 (%)</th><th>H@10</th></tr></thead><tbody>{rows}</tbody></table>")
