"""Prompt files by fuzzing: any bytes end in a valid prompt set or one clear BricklabError; valid
files round-trip; the named hard cases (huge, binary, odd encodings, formula cells) are answered."""

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from core import prompts
from core.errors import BricklabError

EXTENSIONS = [".jsonl", ".csv", ".txt", ".JSONL", ".Txt", ".json", ".xlsx", ""]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "latin-1"]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_valid(ps: prompts.PromptSet) -> None:
    """What every page and the capture rely on in a parsed set."""
    assert isinstance(ps, prompts.PromptSet) and 1 <= len(ps) <= prompts.MAX_PROMPTS
    assert ps.name and ps.name.isprintable()
    ids = [p.id for p in ps.prompts]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
    for p in ps.prompts:
        assert isinstance(p.text, str) and p.text.strip() and len(p.text) <= prompts.MAX_PROMPT_CHARS
        assert p.category is None or (isinstance(p.category, str) and p.category.strip())
        for value in (p.id, p.category or "", p.text):
            value.encode("utf-8")  # storable in DuckDB and readable by a tokenizer
    assert len(ps.hash) == 16 and all(isinstance(w, str) for w in ps.warnings)


def parse_or_refuse(data: bytes, filename: str) -> prompts.PromptSet | None:
    """The set, or None after one BricklabError with a message and a hint; anything else fails."""
    try:
        ps = prompts.parse_prompts(data, filename)
    except BricklabError as err:
        assert err.message and err.hint, err
        return None
    assert_valid(ps)
    return ps


# --- arbitrary input -------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(EXTENSIONS))
def test_arbitrary_bytes_give_a_prompt_set_or_a_clear_error(data, ext):
    parse_or_refuse(data, "upload" + ext)


@FUZZ
@given(st.text(max_size=400), st.sampled_from(ENCODINGS), st.sampled_from(EXTENSIONS[:3]))
def test_arbitrary_text_in_any_encoding_gives_a_prompt_set_or_a_clear_error(text, encoding, ext):
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    parse_or_refuse(data, "upload" + ext)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
rows = st.fixed_dictionaries(
    {"text": st.text(max_size=30)},
    optional={"id": json_values, "category": st.none() | st.text(max_size=8) | json_values},
)


@FUZZ
@given(st.lists(rows | json_values, min_size=1, max_size=8), st.booleans())
def test_near_valid_jsonl_gives_a_prompt_set_or_a_clear_error(lines, ascii_only):
    text = "\n".join(json.dumps(line, ensure_ascii=ascii_only) for line in lines)
    parse_or_refuse(text.encode("utf-8", "surrogatepass"), "near.jsonl")


@FUZZ
@given(
    st.lists(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=6).map("".join),
    st.booleans(),
)
def test_jsonl_escapes_of_any_code_point_give_a_prompt_set_or_a_clear_error(text, ascii_only):
    """JSON can spell lone surrogates (\\ud800) that no tokenizer or database takes."""
    line = json.dumps({"id": text, "category": text, "text": text}, ensure_ascii=ascii_only)
    parse_or_refuse(line.encode("utf-8", "surrogatepass"), "escapes.jsonl")


@FUZZ
@given(st.lists(st.lists(st.text(max_size=12), max_size=4), min_size=1, max_size=6), st.booleans())
def test_near_valid_csv_gives_a_prompt_set_or_a_clear_error(cells, with_header):
    out = io.StringIO()
    writer = csv.writer(out)
    if with_header:
        writer.writerow(["category", "text"])
    writer.writerows(cells)
    try:
        data = out.getvalue().encode("utf-8")
    except UnicodeEncodeError:
        assume(False)
    parse_or_refuse(data, "near.csv")


# --- valid files round-trip ------------------------------------------------------------------

prompt_texts = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40
).filter(str.strip)
categories = st.none() | st.sampled_from(prompts.CATEGORIES) | st.text("abcé-_ ", min_size=1, max_size=6)


@ROUND_TRIP
@given(
    st.lists(st.tuples(categories, prompt_texts), min_size=1, max_size=8),
    st.sampled_from(["jsonl", "jsonl-ascii", "csv"]),
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
)
def test_a_valid_file_reads_back_exactly(items, kind, encoding):
    """Every prompt comes back with its own text (stripped) and category, in order: no text is split,
    joined or lost, whatever characters it holds (U+2028, form feeds, quotes, commas)."""
    if kind.startswith("jsonl"):
        lines = [json.dumps({"id": f"q{i}", "category": c, "text": t}, ensure_ascii=kind == "jsonl-ascii")
                 for i, (c, t) in enumerate(items)]  # fmt: skip
        text = "\n".join(lines) + "\n"
    else:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", "category", "text"])
        writer.writerows([f"q{i}", c or "", t] for i, (c, t) in enumerate(items))
        text = out.getvalue()
    ps = parse_or_refuse(text.encode(encoding), f"set.{kind.split('-')[0]}")
    assert ps is not None
    expected = [(f"q{i}", (c or "").strip() or None, t.strip()) for i, (c, t) in enumerate(items)]
    assert [(p.id, p.category, p.text) for p in ps.prompts] == expected


# --- the named hard cases --------------------------------------------------------------------

TEN_MB = 10 * 2**20


@pytest.mark.parametrize(
    ("filename", "data", "message"),
    [
        ("empty.jsonl", b"", "no prompts"),
        ("empty.csv", b"", "needs a 'text' column"),
        ("bom-only.txt", b"\xef\xbb\xbf", "no prompts"),
        ("utf16-bom-only.txt", b"\xff\xfe", "no prompts"),
        ("zeros.txt", bytes(1024), "binary"),
        ("elf.jsonl", b"\x7fELF\x02\x01\x01\x00" + bytes(56), "binary"),
        ("gzip.csv", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(20), "binary"),
        ("bad-utf8.jsonl", b'{"text": "caf\xc3"}\n', "not valid UTF-8"),
        ("overlong.txt", b"\xc0\xaf etc/passwd\n", "not valid UTF-8"),
        ("odd-utf16.txt", b"\xff\xfeh\x00i", "binary"),
        ("lone-surrogate.jsonl", b'{"text": "a\\ud800b"}\n', "invalid character escape"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", "nested too deeply"),
    ],
)
def test_named_bad_files_get_clear_errors(filename, data, message):
    with pytest.raises(BricklabError, match=message) as err:
        prompts.parse_prompts(data, filename)
    assert err.value.hint


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv"])
def test_a_10mb_single_line_is_cut_with_a_warning_in_every_format(ext):
    long = "word " * (TEN_MB // 5)
    data = {
        "txt": lambda: long.encode(),
        "jsonl": lambda: json.dumps({"id": "big", "text": long}).encode(),
        "csv": lambda: ("text\n" + long + "\n").encode(),
    }[ext]()
    assert len(data) >= TEN_MB
    ps = prompts.parse_prompts(data, f"long.{ext}")
    assert [len(p.text) for p in ps.prompts] == [prompts.MAX_PROMPT_CHARS]
    assert len(ps.warnings) == 1 and "cut to" in ps.warnings[0]


@pytest.mark.parametrize(("ext", "line"), [("txt", b"hi\n"), ("jsonl", b'{"text":"hi"}\n'), ("csv", b"hi\n")])
def test_a_million_short_lines_are_refused_by_count(ext, line):
    data = (b"text\n" if ext == "csv" else b"") + line * 1_000_000
    assert len(data) <= prompts.MAX_FILE_BYTES
    with pytest.raises(BricklabError, match="more than 20,000 prompts; the limit is 20,000"):
        prompts.parse_prompts(data, f"million.{ext}")


def test_the_prompt_count_limit_is_exact():
    at_limit = b"".join(b"p%d\n" % i for i in range(prompts.MAX_PROMPTS))
    assert len(prompts.parse_prompts(at_limit, "limit.txt")) == prompts.MAX_PROMPTS
    with pytest.raises(BricklabError, match="the limit is 20,000"):
        prompts.parse_prompts(at_limit + b"one more\n", "limit.txt")


def test_a_late_duplicate_id_among_many_is_found():
    lines = [json.dumps({"id": f"i{k}", "text": "t"}) for k in range(prompts.MAX_PROMPTS - 1)]
    data = ("\n".join(lines) + '\n{"id": "i5", "text": "again"}\n').encode()
    with pytest.raises(BricklabError, match="'i5' appears more than once"):
        prompts.parse_prompts(data, "dups.jsonl")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
def test_byte_order_marks_and_utf16_without_one(encoding):
    text = "category,text\ntranslation,Übersetze «ça» ✓ 日本\n"
    data = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # no BOM: refused as binary, never mis-read
        with pytest.raises(BricklabError, match="binary"):
            prompts.parse_prompts(data, "enc.csv")
        data = "\ufeff".encode(encoding) + data
    ps = prompts.parse_prompts(data, "enc.csv")
    assert [(p.category, p.text) for p in ps.prompts] == [("translation", "Übersetze «ça» ✓ 日本")]


def test_utf32_is_refused_clearly():
    with pytest.raises(BricklabError):
        prompts.parse_prompts("text\nhello\n".encode("utf-32"), "enc.csv")


FORMULAS = ["=SUM(A1:A3)", "+1+2", "-2+3", "@SUM(1)", "=cmd|' /C calc'!A0", '=HYPERLINK("http://x")']


@pytest.mark.parametrize("ext", ["csv", "jsonl", "txt"])
def test_formula_like_cells_stay_verbatim_text(ext):
    if ext == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([["text"], *[[f] for f in FORMULAS]])
        data = out.getvalue().encode()
    elif ext == "jsonl":
        data = "\n".join(json.dumps({"text": f}) for f in FORMULAS).encode()
    else:
        data = "\n".join(FORMULAS).encode()
    ps = prompts.parse_prompts(data, f"formulas.{ext}")
    assert [p.text for p in ps.prompts] == FORMULAS


@pytest.mark.parametrize(
    "filename", ["../../etc/passwd.txt", "/etc/passwd.txt", "a\x00b.txt", "..\\..\\win.txt", "\n\t.txt"]
)
def test_the_file_name_only_names_the_set(filename):
    ps = prompts.parse_prompts(b"hello\n", filename)
    assert ps.name.isprintable() and "/" not in ps.name and ps.name
    assert [p.text for p in ps.prompts] == ["hello"]
