"""A self-contained HTML page of similar-case queries and their hits, as pictures.

``cbmir demo`` writes one: each query's thumbnail beside its hits' thumbnails, with modality,
finding and distance under each. Pictures are inline PNGs (``data:`` URIs), so the file can be
opened, mailed or archived on its own. Every text is escaped; nothing in it comes from a patient
(UIDs, codes, labels and numbers only).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Card:
    """One picture with its caption lines; ``png`` None shows a placeholder."""

    png: bytes | None
    title: str
    lines: Sequence[str] = ()
    highlight: bool = False  # e.g. the hit's finding matches the query's


@dataclass
class QuerySection:
    """A query and its hits, best first."""

    query: Card
    hits: list[Card] = field(default_factory=list)
    note: str = ""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #111; color: #eee; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.05rem; margin: 1.6rem 0 .4rem; }
.row { display: flex; gap: .8rem; align-items: flex-start; overflow-x: auto; }
.card { background: #222; border-radius: 6px; padding: .4rem; width: 168px; flex: none; }
.card.query { border: 2px solid #4a9eff; } .card.match { border: 2px solid #3c3; }
.card img, .card .none { width: 160px; height: 160px; object-fit: contain; background: #000; display: block; }
.card .none { display: flex; align-items: center; justify-content: center; color: #777; }
.card b { display: block; margin-top: .3rem; font-size: .85rem; }
.card span { display: block; font-size: .75rem; color: #bbb; word-break: break-all; }
.note { color: #bbb; font-size: .85rem; } .meta { color: #999; font-size: .8rem; }
"""


def _card(card: Card, kind: str) -> str:
    classes = f"card {kind}" + (" match" if card.highlight else "")
    if card.png is not None:
        picture = f'<img alt="" src="data:image/png;base64,{base64.b64encode(card.png).decode()}">'
    else:
        picture = '<div class="none">no picture</div>'
    lines = "".join(f"<span>{html.escape(line)}</span>" for line in card.lines)
    return f'<div class="{classes}">{picture}<b>{html.escape(card.title)}</b>{lines}</div>'


def write_report(path: Path, title: str, sections: Sequence[QuerySection], notes: Sequence[str] = ()) -> Path:
    """Write the page to ``path``; returns it."""
    when = dt.datetime.now().replace(microsecond=0).isoformat(sep=" ")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">written {html.escape(when)}</p>',
        *(f'<p class="note">{html.escape(note)}</p>' for note in notes),
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.query.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        cards = [_card(section.query, "query"), *(_card(hit, "hit") for hit in section.hits)]
        parts.append(f'<div class="row">{"".join(cards)}</div>')
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
