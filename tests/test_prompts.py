"""Prompt sets: the bundled default, the three file formats, and every kind of bad file."""

import json

import pytest

from core import prompts
from core.errors import BricklabError


def parse(text: str | bytes, filename: str) -> prompts.PromptSet:
    return prompts.parse_prompts(text.encode() if isinstance(text, str) else text, filename)


def test_default_set_covers_seven_categories_with_80_each():
    ps = prompts.default_prompt_set()
    assert ps.categories == list(prompts.CATEGORIES)
    for category in prompts.CATEGORIES:
        texts = [p.text for p in ps.prompts if p.category == category]
        assert len(texts) >= 80 and len(set(texts)) == len(texts), category
    assert len({p.id for p in ps.prompts}) == len(ps)
    assert not ps.warnings


def test_head_keeps_every_category_and_the_file_order():
    ps = prompts.default_prompt_set()
    small = ps.head(21)
    assert len(small) == 21 and small.categories == list(prompts.CATEGORIES)
    order = [p.id for p in ps.prompts]
    assert [order.index(p.id) for p in small.prompts] == sorted(order.index(p.id) for p in small.prompts)
    assert ps.head(len(ps) + 5) is ps
    assert small.hash != ps.hash and small.hash == ps.head(21).hash


def test_jsonl():
    rows = [{"id": "a", "category": "math", "text": " 2+2? "}, {"id": "b", "text": "Hi"}]
    ps = parse("\n".join(json.dumps(r) for r in rows) + "\n\n", "mine.jsonl")
    assert [(p.id, p.category, p.text) for p in ps.prompts] == [("a", "math", "2+2?"), ("b", None, "Hi")]
    assert ps.name == "mine"


def test_csv_with_quoting_and_optional_category():
    ps = parse('category,text\nmath,"1, 2, 3 — next?"\n,"a ""quoted""\nline"\n', "set.csv")
    assert [(p.category, p.text) for p in ps.prompts] == [
        ("math", "1, 2, 3 — next?"),
        (None, 'a "quoted"\nline'),
    ]


def test_txt_one_prompt_per_line():
    ps = parse("first\n\n  second  \r\nthird", "lines.txt")
    assert [p.text for p in ps.prompts] == ["first", "second", "third"]
    assert all(p.category is None for p in ps.prompts) and len({p.id for p in ps.prompts}) == 3


def test_csv_formula_cells_stay_text():
    ps = parse("category,text\nmath,\"=SUM(A1:A3)\"\nmath,=cmd|' /C calc'!A0\n", "f.csv")
    assert [p.text for p in ps.prompts] == ["=SUM(A1:A3)", "=cmd|' /C calc'!A0"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_byte_order_marks(encoding):
    data = "category,text\nlinguistic,Übersetze «ça» ✓\n".encode(encoding)
    assert data[:2] in (b"\xef\xbb", b"\xff\xfe", b"\xfe\xff")
    ps = parse(data, "bom.csv")
    assert [(p.category, p.text) for p in ps.prompts] == [("linguistic", "Übersetze «ça» ✓")]


BAD_FILES = [
    ("empty.txt", b"", "no prompts"),
    ("blank.jsonl", b"\n  \n", "no prompts"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary"),
    ("latin1.txt", "café crème\n".encode("latin-1"), "not valid UTF-8"),
    (
        "notext.jsonl",
        b'{"id": "a", "text": "ok"}\n{"id": "b", "prompt": "x"}\n',
        'Line 2 has no string field "text"',
    ),
    ("number.jsonl", b'{"text": 5}\n', 'no string field "text"'),
    ("broken.jsonl", b'{"text": "a"\n', "Line 1 is not valid JSON"),
    ("cols.csv", b"question,answer\nwhat,that\n", "needs a 'text' column"),
    ("nohead.csv", b"", "needs a 'text' column"),
    ("dup.jsonl", b'{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "'x' appears more than once"),
    ("prompts.xlsx", b"text\n", "unknown extension"),
]


@pytest.mark.parametrize("filename,data,message", BAD_FILES)
def test_bad_files_get_clear_errors(filename, data, message):
    with pytest.raises(BricklabError, match=message) as err:
        parse(data, filename)
    assert err.value.hint


def test_a_10mb_line_is_cut_with_a_warning(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("short\n" + "word " * 2_000_000 + "\n")
    ps = prompts.load_prompt_file(path)
    assert [len(p.text) for p in ps.prompts] == [5, prompts.MAX_PROMPT_CHARS]
    assert len(ps.warnings) == 1 and "Line 2" in ps.warnings[0]


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(prompts.MAX_FILE_BYTES + 1)  # sparse: refused on its size alone
    with pytest.raises(BricklabError, match="the limit is 20 MiB"):
        prompts.load_prompt_file(path)
    with pytest.raises(BricklabError, match="the limit is 20 MiB"):
        prompts.parse_prompts(b"a\n" * (prompts.MAX_FILE_BYTES // 2 + 1), "huge.txt")


def test_missing_file(tmp_path):
    with pytest.raises(BricklabError, match="does not exist"):
        prompts.load_prompt_file(tmp_path / "nope.jsonl")


def test_a_folder_is_refused_as_a_folder_naming_a_file_to_pass(tmp_path):
    with pytest.raises(BricklabError) as err:
        prompts.load_prompt_file(tmp_path)
    assert err.value.message == f"'{tmp_path}' is a folder, not a prompt file."
    assert err.value.hint == "Pass one .jsonl, .csv or .txt file."
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "set.jsonl").write_text('{"text": "x"}')
    with pytest.raises(BricklabError) as err:
        prompts.load_prompt_file(tmp_path)
    assert err.value.hint == f"Pass one .jsonl, .csv or .txt file, e.g. '{tmp_path / 'set.jsonl'}'."


def test_plain_strings_become_a_prompt_set_with_a_stable_hash():
    ps = prompts.from_texts(["  Hello  ", "", "World"])
    assert [(p.id, p.category, p.text) for p in ps.prompts] == [
        ("p00001", None, "Hello"),
        ("p00003", None, "World"),
    ]
    assert ps.hash == prompts.from_texts(["Hello", " ", "World"]).hash  # ids follow positions, blanks dropped
    assert prompts.as_prompt_set(ps) is ps
    assert prompts.as_prompt_set(iter(["Hello"])).prompts[0].text == "Hello"


@pytest.mark.parametrize(
    "texts, says",
    [
        ("one string", "not a list"),
        (["ok", 3], r"Prompt 2 is not a string \(int\)"),
        (["", "  "], "no prompts"),
        (["\ud800"], "surrogate"),
    ],
)
def test_bad_plain_strings_are_refused(texts, says):
    with pytest.raises(BricklabError, match=says):
        prompts.from_texts(texts)


def test_encode_cuts_at_the_limit_and_the_model_caps_the_limit(tiny_lm):
    text = "Name three colours and one number."
    full = prompts.encode(tiny_lm.tokenizer, text, 10**6)
    assert not full.truncated and full.start < full.end <= len(full.ids)
    cut = prompts.encode(tiny_lm.tokenizer, text, full.start + 2)
    assert cut.truncated and cut.ids == full.ids[: full.start + 2] and cut.end == full.start + 2
    plain = prompts.encode(tiny_lm.tokenizer, text, 10**6, chat_template=False)
    assert (plain.start, plain.end) == (0, len(plain.ids)) and len(plain.ids) < len(full.ids)
    positions = tiny_lm.model.config.max_position_embeddings
    assert prompts.token_limit(tiny_lm.model, 10**9) == positions
    assert prompts.token_limit(tiny_lm.model, 5) == 5
