"""Render the report's blocks (sections.py) as markdown and as one self-contained HTML page; every string is
escaped, so a token such as '</script>' is shown, never obeyed."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}th{background:#f3f3f3}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}b{background:#fe9}"""

_NUMERIC = re.compile(r"[-+0-9.,e%± –]*[0-9–][-+0-9.,e%± –]*")


def _numeric(cells: list) -> bool:
    cells = [c for c in cells if isinstance(c, str) and c]
    return bool(cells) and all(_NUMERIC.fullmatch(c) for c in cells)


def _md_esc(s: str) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", s)


def _inline(x, esc, bold: str) -> str:
    pieces = [(x, False)] if isinstance(x, str) else x
    return "".join(bold.format(esc(t)) if em and t else esc(t) for t, em in pieces)


def render_md(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + _md_esc(b[2]))
        elif b[0] == "p":
            out.append(_inline(b[1], _md_esc, "<b>{}</b>"))
        elif b[0] == "img":
            out.append(f"![{b[2]}](plots/{b[1]}.png)")
        else:
            _, headers, rows = b
            num = [_numeric([row[i] for row in rows]) for i in range(len(headers))]
            lines = ["| " + " | ".join(_md_esc(h) for h in headers) + " |",
                     "|" + "|".join("---:" if n else "---" for n in num) + "|"]
            lines += ["| " + " | ".join(_inline(c, _md_esc, "<b>{}</b>") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def render_body(blocks: list, plots: dict[str, Path]) -> str:
    """The blocks as HTML elements, without the page around them (a notebook cell shows this)."""
    esc, out = html.escape, []
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1], esc, '<b>{}</b>')}</p>")
        elif b[0] == "img":
            data = base64.b64encode(plots[b[1]].read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{esc(b[2])}" src="data:image/png;base64,{data}"></p>')
        else:
            _, headers, rows = b
            cls = [' class="num"' if _numeric([row[i] for row in rows]) else "" for i in range(len(headers))]
            head = "".join(f"<th{c}>{esc(h)}</th>" for c, h in zip(cls, headers))
            body = "".join("<tr>" + "".join(f"<td{c}>{_inline(x, esc, '<b>{}</b>')}</td>"
                                            for c, x in zip(cls, row)) + "</tr>\n" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>")
    return "\n".join(out)


def render_html(blocks: list, plots: dict[str, Path]) -> str:
    title = html.escape(blocks[0][2]) if blocks and blocks[0][0] == "h" else "superweight report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + render_body(blocks, plots) + "\n</body></html>\n")
