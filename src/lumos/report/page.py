"""A self-contained HTML page: inline CSS, images as data URIs, no scripts, no CDN."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd;
     padding-bottom: .2rem; margin-top: 2.2rem; } h3 { margin-top: 1.4rem; }
table.lumos { border-collapse: collapse; font-size: .85rem; margin: .6rem 0; }
table.lumos th, table.lumos td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; }
table.lumos th { background: #f4f6f8; }
img { max-width: 100%; height: auto; } .note { color: #666; font-size: .9rem; }
nav a { margin-right: 1rem; } .error { color: #a33; }
"""


@dataclass
class Page:
    """An HTML page built section by section."""

    title: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, heading: str, body_html: str, anchor: str | None = None) -> None:
        anchor = anchor or heading.lower().replace(" ", "-")
        self.sections.append((anchor, heading, body_html))

    def render(self) -> str:
        nav = "".join(
            f'<a href="#{html.escape(a)}">{html.escape(h)}</a>' for a, h, _ in self.sections
        )
        body = "".join(
            f'<section id="{html.escape(a)}"><h2>{html.escape(h)}</h2>{b}</section>'
            for a, h, b in self.sections
        )
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><nav>{nav}</nav>{body}</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def paragraph(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"
