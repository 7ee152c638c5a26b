"""User text never renders as markup: a run whose categories, prompt ids and texts hold Markdown,
HTML and LaTeX is shown on every page (AppTest), and every Markdown body, widget label and Plotly
figure holds those strings escaped (ui/text.py), never as an image, a link, formatting or a formula.
"""

from __future__ import annotations

import html
import json
import re

import pytest

from core import prompts
from core.bricks import candidates as bricks
from core.capture import run as capture
from core.live import adapter_train
from core.store import Store
from tests.conftest import app
from ui import text

HOSTILE = [
    "![x](http://127.0.0.1:8600/cat.png)",
    "**bold**",
    "$$x^2$$",
    "<b>b</b>",
    "[link](http://x)",
]
PROMPT_ID = "_id_ <i>[y](http://y)</i>"  # every prompt id starts with this, then a number
MARKDOWN_KINDS = ("markdown", "caption", "subheader", "header", "title",
                  "error", "warning", "success", "info")  # fmt: skip
LABELLED_KINDS = ("radio", "selectbox", "multiselect", "button", "text_input", "text_area", "number_input",
                  "slider", "toggle", "checkbox", "metric", "expander", "segmented_control")  # fmt: skip


def render(body: str) -> str:
    """HTML of a Markdown body by a CommonMark parser with GFM tables and strikethrough."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(body)


@pytest.mark.parametrize(
    "value",
    [*HOSTILE, PROMPT_ID, "# heading", "1. item", "- item", "> quote", "`code`", "~~gone~~", "a | b",
     "<http://x>", "www.example.com", "a@b.co", "x\\*y", "&amp;", ":red[red] :streamlit:", "two\n\nlines",
     "snake_case_name", "[x]: http://y", "---"],
)  # fmt: skip
def test_md_renders_as_the_same_text_and_nothing_else(value):
    shown = render(text.md(value)).strip()
    inner = re.fullmatch(r"<p>(.*)</p>", shown, re.S)
    assert inner, shown  # one paragraph: no heading, list, quote, rule or table
    assert "<" not in inner.group(1)  # no element inside it: no link, image, emphasis or code
    literal = html.unescape(inner.group(1)).replace(text.WORD_JOINER, "")
    assert literal == " ".join(value.splitlines()).strip()
    assert not re.search(r"(?<!\\)\$", text.md(value))  # KaTeX sees no unescaped dollar


def test_code_span_keeps_backticks_verbatim():
    shown = render(text.code("a `b` ``c")).strip()
    assert html.unescape(re.fullmatch(r"<p><code>(.*)</code></p>", shown).group(1)) == "a `b` ``c"


def test_plain_leaves_no_tag_or_formula_for_plotly():
    assert text.plain("<b>x</b> & $y$") == "&lt;b&gt;x&lt;/b&gt; &amp; &#36;y&#36;"
    assert text.plain_labels(["<br>", 3]) == ["&lt;br&gt;", 3]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_lm):
    """(cache path, run id): 4 prompts in each hostile category, hostile ids and texts."""
    items = [
        prompts.Prompt(f"{PROMPT_ID}{i}", cat, f"Text {i} about {cat} and <b>{i}</b> $$y_{i}$$ in the end.")
        for c, cat in enumerate(HOSTILE)
        for i in range(4 * c, 4 * c + 4)
    ]
    path = tmp_path_factory.mktemp("markup") / "cache.duckdb"
    store = Store(path)
    result = capture.capture(tiny_lm, prompts.PromptSet("**set** <b>s</b>", tuple(items)), store)
    store.close()
    return path, result.run_id


@pytest.fixture
def on_hostile_run(monkeypatch, hostile_run, tiny_dir):
    monkeypatch.setenv("BRICKLAB_DB", str(hostile_run[0]))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return hostile_run


def bodies(at) -> list[str]:
    """Every string Streamlit reads as Markdown on the page: bodies and widget/metric labels."""
    found = [str(e.value) for kind in MARKDOWN_KINDS for e in getattr(at, kind)]
    found += [str(e.label) for kind in LABELLED_KINDS for e in getattr(at, kind)]
    return found


def figure_strings(at) -> list[str]:
    """Every string in the page's Plotly figures (labels, ticks, names, hover text, titles)."""
    out: list[str] = []

    def walk(node):
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            list(map(walk, node.values()))
        elif isinstance(node, list):
            list(map(walk, node))

    for chart in at.get("plotly_chart"):
        walk(json.loads(chart.proto.spec))
    return out


def assert_text_only(at, expect: list[str] = (), expect_in_figures: list[str] = ()) -> None:
    """No hostile string in a Markdown body or a figure as written; the escaped forms are there."""
    assert not at.exception, at.exception
    shown = bodies(at)
    for value in {*HOSTILE, PROMPT_ID, *(v for v in expect if re.search(r"[*$<\[`]", v))}:
        raw = [b for b in shown if value in b]
        assert not raw, f"{value!r} unescaped in {raw[:2]}"
    for body in shown:
        rendered = render(body)
        assert "<img" not in rendered and "<a " not in rendered, body
        assert "<strong>bold</strong>" not in rendered and "<i>" not in rendered, body
    for value in expect:
        assert any(text.md(value) in b for b in shown), f"{value!r} not shown"
    strings = figure_strings(at)
    assert not [s for s in strings if "<b>" in s or "<i>" in s or "$$" in s]
    for value in expect_in_figures:
        assert text.plain(value) in strings, f"{value!r} not in a figure"


def test_home_and_capture(on_hostile_run):
    assert_text_only(app("app.py").run())
    at = app("1_Capture.py").run()
    assert_text_only(at, expect=["**set** <b>s</b>", *HOSTILE])  # the run summary
    at.radio[0].set_value("My own file").run()
    jsonl = "\n".join(json.dumps({"id": f"{PROMPT_ID}{i}", "category": c, "text": f"{c} {i}"})
                      for i, c in enumerate(HOSTILE))  # fmt: skip
    name = "![f](f.png) **up** $$u$$.jsonl"  # no "/": the shown name is the file's last part
    at.file_uploader[0].set_value((name, jsonl.encode(), "text/plain")).run()
    shown_name = prompts.parse_prompts(jsonl.encode(), name).name  # the set's name, from the file's
    assert "**up**" in shown_name
    assert_text_only(at, expect=[*HOSTILE, shown_name])


def test_neuron_map_detail_and_search(on_hostile_run):
    at = app("2_Neuron_map.py").run()
    at.number_input[0].set_value(1)
    at.number_input[1].set_value(7)
    at.button[0].click().run()  # open neuron 1:7: its examples name prompt ids and categories
    assert any(text.md(PROMPT_ID) in c.value for c in at.caption)
    assert_text_only(at, expect_in_figures=HOSTILE)  # the functionality score per category
    at.text_input[0].input("**the** <b>[z](http://z)").run()
    assert_text_only(at, expect=["**the** <b>[z](http://z)"])


def test_bricks_functional(on_hostile_run):
    at = app("3_Bricks.py")
    at.session_state["brick"] = f"functional-{HOSTILE[0]}"
    at.run()
    at.radio[0].set_value("functional").run()
    assert_text_only(at, expect=[f"functional-{HOSTILE[0]}"], expect_in_figures=HOSTILE)


def test_playground_brick_labels_and_category_loss(on_hostile_run):
    at = app("4_Playground.py")
    at.session_state["brick_params"] = bricks.BrickParams(method="functional").to_dict()
    at.run()
    names = [f"functional-{c}" for c in HOSTILE[:2]]
    at.multiselect[0].set_value(names).run()
    at.toggle[0].set_value(True).run()  # perplexity change per category
    assert_text_only(at, expect=names, expect_in_figures=HOSTILE)
    at.radio[0].set_value("Pick one from the run").run()
    assert_text_only(at)


def test_export_upload_names_and_problems(on_hostile_run):
    at = app("6_Export.py").run()
    bad = {"schema_version": 1, "bricks": [{"name": "<b>n</b>", "neurons": {"**0**": [1]}, "mode": "$$x$$"}]}
    at.file_uploader[0].set_value(("[c](http://c).json", json.dumps(bad).encode(), "application/json")).run()
    assert at.error
    assert_text_only(at, expect=["[c](http://c).json"])


def test_custom_bricks_and_paper(on_hostile_run):
    at = app("7_Custom_bricks.py").run()
    name, data = "**facts** $$f$$.txt", b"One fact.\nAnother fact.\n"
    at.file_uploader[0].set_value((name, data, "text/plain")).run()
    shown_name = adapter_train.parse_facts(data, name).name
    assert "**facts**" in shown_name
    assert_text_only(at, expect=[shown_name])
    at = app("5_Paper.py").run()
    at.toggle[0].set_value(True).run()  # quick
    next(b for b in at.button if b.label.startswith("Compute the")).click().run()
    assert_text_only(at, expect_in_figures=HOSTILE)  # the ablation and overlap matrices
