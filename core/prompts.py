"""Prompt sets: the bundled default, and a person's own JSONL, CSV or plain-text file, validated.

A prompt set is a tuple of `Prompt`s; its hash (over ids, categories and texts) keys captured runs.
`encode` turns one prompt into the token ids every model pass uses (capture, losses, generation).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import settings
from core.errors import BricklabError

CATEGORIES = ("coding", "math", "linguistic", "knowledge", "translation", "ethics", "writing")
MAX_FILE_BYTES = 20 * 1024 * 1024  # uploads past this are refused before parsing
MAX_PROMPTS = 20_000
FORMATS = (".jsonl", ".csv", ".txt")  # the file name's suffix picks the parser (parse_prompts)
MAX_PROMPT_CHARS = 20_000  # longer texts are cut here; the model's context cuts tokens later


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str | None
    text: str


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]
    warnings: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(json.dumps([p.id, p.category, p.text]).encode())
        return h.hexdigest()[:16]

    @property
    def categories(self) -> list[str]:
        found = {p.category for p in self.prompts if p.category}
        return [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> PromptSet:
        """The first n prompts, spread over categories so a small run still has every one."""
        if n >= len(self.prompts):
            return self
        by_cat: dict[str | None, list[Prompt]] = {}
        for p in self.prompts:
            by_cat.setdefault(p.category, []).append(p)
        picked: list[Prompt] = []
        rank = 0
        while len(picked) < n:
            for group in by_cat.values():
                if rank < len(group) and len(picked) < n:
                    picked.append(group[rank])
            rank += 1
        order = {p.id: i for i, p in enumerate(self.prompts)}
        picked.sort(key=lambda p: order[p.id])
        return PromptSet(f"{self.name}[:{n}]", tuple(picked), self.warnings)


def halves(labels, seed: int = 0) -> np.ndarray:
    """bool (n_prompts,) from each prompt's category label: True for half A, drawn per category so
    each half keeps the category mix. Capture counts co-activations per half of seed 0 (issue #16);
    stability compares results computed on the two halves."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        half[members[: (len(members) + 1) // 2]] = True
    return half


def category_labels(prompt_set: PromptSet) -> np.ndarray:
    """int32 label per prompt: the index of its category in the set's categories (-1 without one)."""
    index = {name: i for i, name in enumerate(prompt_set.categories)}
    return np.asarray([index.get(p.category, -1) for p in prompt_set.prompts], dtype=np.int32)


def default_prompt_set() -> PromptSet:
    return load_prompt_file(settings.default_prompts_path(), name="default")


def load_prompt_file(path: str | Path, name: str | None = None) -> PromptSet:
    path = Path(path)
    if path.is_dir():
        raise _folder_error(path)
    if not path.is_file():
        raise BricklabError(f"The prompt file '{path}' does not exist.", "Check the path.")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise _too_big(path.stat().st_size)
    return parse_prompts(path.read_bytes(), path.name, name=name or path.stem)


def _folder_error(path: Path) -> BricklabError:
    try:  # naming one of the folder's prompt files makes the fix concrete
        found = min((f for f in path.iterdir() if f.suffix.lower() in FORMATS and f.is_file()), default=None)
    except OSError:  # an unreadable folder: the message names no file
        found = None
    example = f", e.g. '{found}'" if found else ""
    return BricklabError(
        f"'{path}' is a folder, not a prompt file.", f"Pass one .jsonl, .csv or .txt file{example}."
    )


def parse_prompts(data: bytes, filename: str, name: str | None = None) -> PromptSet:
    """Parse uploaded bytes; the file name only picks the format, never a path on disk."""
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(len(data))
    text = _decode(data, filename)
    kind = Path(filename).suffix.lower()
    parser = {".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt}.get(kind)
    if parser is None:
        raise BricklabError(f"'{filename}' has an unknown extension.", "Use .jsonl, .csv or .txt.")
    prompts, warnings = parser(text)
    if not prompts:
        raise BricklabError(f"'{filename}' holds no prompts.", "Add at least one non-empty prompt.")
    if len(prompts) > MAX_PROMPTS:  # parsers stop one past the limit: a huge file is not read whole
        raise BricklabError(
            f"'{filename}' holds more than {MAX_PROMPTS:,} prompts; the limit is {MAX_PROMPTS:,}.",
            "Split the file or capture a sample.",
        )
    dup = next((i for i, n in Counter(p.id for p in prompts).items() if n > 1), None)
    if dup is not None:
        raise BricklabError(f"'{filename}': the id '{dup}' appears more than once.", "Make ids unique.")
    return PromptSet(name or _display_name(filename), tuple(prompts), tuple(warnings))


def from_texts(texts: Iterable[str], name: str | None = None) -> PromptSet:
    """A prompt set from plain strings, in order: ids p00001, p00002, ..., no categories. Texts are
    checked like a file's lines (blank ones dropped, long ones cut with a warning)."""
    if isinstance(texts, (str, bytes)):
        raise BricklabError("Got one string, not a list of prompts.", "Pass a list of strings: [text].")
    prompts, warnings = [], []
    for i, text in enumerate(texts, 1):
        if not isinstance(text, str):
            raise BricklabError(f"Prompt {i} is not a string ({type(text).__name__}).", "Pass strings only.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BricklabError(f"Prompt {i} holds a lone surrogate.", "Fix or drop that text.") from None
        body = _clean(text, f"Prompt {i}", warnings)
        if body:
            prompts.append(Prompt(f"p{i:05d}", None, body))
        if len(prompts) > MAX_PROMPTS:
            raise BricklabError(f"More than {MAX_PROMPTS:,} prompts; the limit.", "Capture a sample.")
    if not prompts:
        raise BricklabError("The list holds no prompts.", "Pass at least one non-empty string.")
    return PromptSet(name or f"{len(prompts)} texts", tuple(prompts), tuple(warnings))


def as_prompt_set(prompts: PromptSet | Iterable[str]) -> PromptSet:
    """A PromptSet as it is; a list (or any iterable) of strings through from_texts."""
    return prompts if isinstance(prompts, PromptSet) else from_texts(prompts)


def _display_name(filename: str) -> str:
    """The set's name from an uploaded file's name: its stem, printable characters only."""
    return "".join(ch for ch in Path(filename).stem if ch.isprintable()) or "prompts"


def _too_big(size: int) -> BricklabError:
    return BricklabError(
        f"The prompt file is {size / 2**20:.1f} MiB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB.",
        "Split it into smaller files.",
    )


def _decode(data: bytes, filename: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    elif b"\x00" not in data[:8192]:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BricklabError(
                f"'{filename}' is not valid UTF-8 text (byte {exc.start}).",
                "Save it as UTF-8 (or UTF-16 with a BOM) and upload it again.",
            ) from exc
    raise BricklabError(
        f"'{filename}' looks like a binary file, not text.", "Upload a .jsonl, .csv or .txt file."
    )


def _clean(text: str, where: str, warnings: list[str]) -> str:
    text = text.strip()
    if len(text) > MAX_PROMPT_CHARS:
        warnings.append(f"{where}: cut to {MAX_PROMPT_CHARS:,} characters.")
        text = text[:MAX_PROMPT_CHARS]
    return text


def _parse_jsonl(text: str) -> tuple[list[Prompt], list[str]]:
    prompts, warnings = [], []
    # Only \n ends a JSONL line: str.splitlines would also split on U+2028 etc., which JSON
    # allows unescaped inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if len(prompts) > MAX_PROMPTS:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BricklabError(
                f"Line {lineno} is not valid JSON ({exc.msg}).", "Fix or remove that line."
            ) from exc
        except RecursionError as exc:
            raise BricklabError(f"Line {lineno} is nested too deeply.", "Fix or remove that line.") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise BricklabError(
                f'Line {lineno} has no string field "text".',
                'Each line must look like {"id": "...", "category": "...", "text": "..."}.',
            )
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            raise BricklabError(f'Line {lineno}: "category" must be a string.', "Fix that line.")
        body = _clean(row["text"], f"Line {lineno}", warnings)
        if body:
            prompt = Prompt(str(row.get("id", f"p{lineno:05d}")), (category or "").strip() or None, body)
            prompts.append(_encodable(prompt, lineno))
    return prompts, warnings


def _encodable(prompt: Prompt, lineno: int) -> Prompt:
    """JSON escapes can spell lone surrogates (\\ud800), which no tokenizer or database takes."""
    try:
        for value in (prompt.id, prompt.category or "", prompt.text):
            value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BricklabError(
            f"Line {lineno} holds an invalid character escape ({exc.object[exc.start]!a}).",
            "Escapes \\ud800-\\udfff must come in valid pairs; fix or remove that line.",
        ) from exc
    return prompt


def _parse_csv(text: str) -> tuple[list[Prompt], list[str]]:
    # The default 128 KiB field limit would refuse a long prompt with a misleading quoting error;
    # texts are cut in _clean instead. (Process-wide, and only ever raised.)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FILE_BYTES))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    if "text" not in columns:
        raise BricklabError(
            f"The CSV header is {reader.fieldnames}; it needs a 'text' column.",
            "Use the header 'category,text' (category may be empty).",
        )
    reader.fieldnames = columns
    prompts, warnings = [], []
    try:
        for rowno, row in enumerate(reader, 2):
            if len(prompts) > MAX_PROMPTS:
                break
            body = _clean(row.get("text") or "", f"Row {rowno}", warnings)
            if body:
                category = (row.get("category") or "").strip() or None
                prompts.append(Prompt(str(row.get("id") or f"p{rowno:05d}"), category, body))
    except csv.Error as exc:
        raise BricklabError(f"The CSV could not be read: {exc}.", "Check its quoting.") from exc
    return prompts, warnings


def _parse_txt(text: str) -> tuple[list[Prompt], list[str]]:
    prompts, warnings = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if len(prompts) > MAX_PROMPTS:
            break
        body = _clean(line, f"Line {lineno}", warnings)
        if body:
            prompts.append(Prompt(f"p{lineno:05d}", None, body))
    return prompts, warnings


# --- encoding for the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # token ids fed to the model (template included)
    start: int  # the prompt's own tokens are ids[start:end]
    end: int
    truncated: bool


def token_limit(model, max_tokens: int) -> int:
    """The most tokens one prompt may have: `max_tokens`, and never more than the model's positions."""
    return min(max_tokens, getattr(model.config, "max_position_embeddings", 10**9))


def encode(tokenizer, text: str, limit: int, chat_template: bool = True) -> Encoded:
    """Token ids for one prompt, wrapped in the tokenizer's chat template when asked and it has one,
    cut to `limit` tokens, and the span of the prompt's own tokens inside them."""
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    rendered, span = text, (0, len(text))
    if templated:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        begin = rendered.rfind(text)
        span = (begin, begin + len(text)) if begin >= 0 else (0, len(rendered))
    enc = tokenizer(rendered, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > span[0] and a < span[1] and b > a]
    start, end = (inside[0], inside[-1] + 1) if inside else (0, len(ids))
    truncated = len(ids) > limit
    if truncated:
        ids = ids[:limit]
        start, end = min(start, limit - 1), min(end, limit)
    return Encoded(ids, start, max(end, start + 1), truncated)
