"""User text shown as text: escaping for Streamlit's Markdown (bodies, captions, headings, labels,
alerts) and for Plotly's pseudo-HTML labels, so that a category, prompt, id, file name, brick name or
search text never renders as an image, a link, formatting or a formula."""

from __future__ import annotations

import re

from core.jobs import duration  # noqa: F401  (the one duration formatter; pages import it from here)

# Anywhere in a line these open Markdown, GFM, KaTeX, raw HTML or entity syntax. `_` only at a word
# edge (intraword underscores never emphasise), so paths and snake_case names keep their look.
_INLINE = re.compile(r"[\\`*~\[\]<&$|@]|(?<![^\W_])_|_(?![^\W_])")
# A colon followed by text can start a Streamlit directive (:red[…]), a GFM URL (http://…) or a
# shortcode; a colon before a space or the end (as in "name: value") is plain.
_COLON = re.compile(r":(?=\S)")
# Streamlit swaps :streamlit:, :material_…: and emoji shortcodes in the parsed text, after
# backslash escapes are gone, so an invisible word joiner after the colon is what breaks them.
_SHORTCODE = re.compile(r"(?<=\\:)(?=[\w+-])")
# Only at the start of a line: headings, quotes, list items, setext/thematic rules, ordered lists.
_LINE_START = re.compile(r"^(\s*)([#>+=-]|\d+(?=[.)]))")
_WWW = re.compile(r"\b(www)\.", re.IGNORECASE)  # GFM turns a bare www.… into a link
WORD_JOINER = "\u2060"


def md(value: object) -> str:
    """`value` as literal text inside Streamlit Markdown (st.markdown, st.caption, st.subheader, widget
    and metric labels, alerts); one line: line breaks become spaces. Not for inside `code spans`."""
    text = " ".join(str(value).splitlines())
    text = _INLINE.sub(lambda m: "\\" + m.group(0), text)
    text = _SHORTCODE.sub(WORD_JOINER, _COLON.sub(r"\\:", text))
    text = _WWW.sub(r"\1\\.", text)
    match = _LINE_START.match(text)
    if match:  # a digit run stays, the list marker after it is escaped
        lead, marker = match.groups()
        rest = text[match.end() :]
        text = f"{lead}\\{marker}{rest}" if not marker[0].isdigit() else f"{lead}{marker}\\{rest}"
    return text


def code(value: object) -> str:
    """`value` as an inline code span whose content Markdown shows verbatim (backticks inside included)."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"  # CommonMark strips one padding space on each side


def plain(value: object) -> str:
    """`value` as literal text in a Plotly label (axis, tick, legend, hover, annotation, title):
    Plotly reads <b>, <br>, <a href> and &entities; in them, and $…$ as LaTeX when MathJax is loaded."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("$", "&#36;")


def plain_labels(values) -> list:
    """Plotly category labels: strings escaped with `plain`, numbers kept (a numeric axis stays one)."""
    return [plain(v) if isinstance(v, str) else v for v in values]


def count(value: float | None) -> str:
    """A count with thousands separators ("11,341"); "–" for none."""
    return "–" if value is None else f"{round(value):,}"
