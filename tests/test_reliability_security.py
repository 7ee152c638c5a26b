"""Security and resource bounds: the server binds to localhost, weights never unpickle, remote code
never runs, upload names never choose a path, search text stays text, generation and uploads are capped."""

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from core import configuration, models, prompts
from core.bricks import neurons
from core.errors import BricklabError
from core.live import compare
from core.routing import tradeoff
from core.store import Store
from tests.conftest import app
from tests.test_models import _Trap

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "app.py", *sorted((ROOT / "core").glob("*.py")), *sorted((ROOT / "ui").glob("*.py")),
           *sorted((ROOT / "pages").glob("*.py"))]  # fmt: skip


# --- the server ------------------------------------------------------------------------------


def test_the_server_binds_to_localhost_headless_without_usage_stats():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
    # the server refuses uploads the prompt parser would refuse anyway
    assert config["server"]["maxUploadSize"] * 2**20 <= prompts.MAX_FILE_BYTES
    make = (ROOT / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in make and "0.0.0.0" not in make


# --- weights and remote code -----------------------------------------------------------------


def copy_without_weights(tiny_dir: str, folder: Path) -> Path:
    folder.mkdir()
    for item in Path(tiny_dir).iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load and pickle loading raise (and are recorded) while a test loads models."""
    calls = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return fail

    for owner, name in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, forbidden(f"{owner.__name__}.{name}"))
    return calls


def test_a_pickle_only_folder_is_refused_without_unpickling(tiny_dir, tmp_path, no_unpickling):
    folder, marker = copy_without_weights(tiny_dir, tmp_path / "pickled"), tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(BricklabError, match="no .safetensors weights") as err:
        models.load_model(str(folder), device="cpu")
    assert "never loads pickled weights" in err.value.hint
    assert not marker.exists() and no_unpickling == []


def test_safetensors_win_over_a_pickle_next_to_them(tiny_dir, tiny_lm, tmp_path, no_unpickling):
    folder, marker = tmp_path / "both", tmp_path / "unpickled"
    shutil.copytree(tiny_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    lm = models.load_model(str(folder), device="cpu")
    assert lm.info.fingerprint == tiny_lm.info.fingerprint
    assert not marker.exists() and no_unpickling == []


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Every keyword argument transformers' Auto*.from_pretrained gets during a test."""
    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        plain = cls.from_pretrained

        def spy(*args, _plain=plain, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _plain(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_every_load_says_trust_remote_code_false(tiny_dir, from_pretrained_calls):
    models.load_model(tiny_dir, device="cpu")
    assert {name for name, _ in from_pretrained_calls} == {
        "AutoConfig",
        "AutoTokenizer",
        "AutoModelForCausalLM",
    }
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in from_pretrained_calls)


def with_remote_code(tiny_dir: str, folder: Path, marker: Path, model_type: str | None = None) -> Path:
    """The tiny model plus an auto_map to modeling files that, if ever imported, leave a marker."""
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_x.XConfig",
        "AutoModelForCausalLM": "modeling_x.XModel",
    }
    config["model_type"] = model_type or config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig as XConfig\n"
    for name in ("configuration_x.py", "modeling_x.py"):
        (folder / name).write_text(code + "from transformers import LlamaForCausalLM as XModel\n")
    return folder


def test_a_model_that_needs_remote_code_is_refused_and_its_code_never_runs(tiny_dir, tmp_path):
    marker = tmp_path / "remote-code-ran"
    folder = with_remote_code(tiny_dir, tmp_path / "custom", marker, model_type="x_custom")
    with pytest.raises(BricklabError, match="custom code") as err:
        models.load_model(str(folder), device="cpu")
    assert "never runs remote code" in err.value.hint
    assert not marker.exists()


def test_an_auto_map_on_a_native_architecture_loads_the_native_class_only(tiny_dir, tmp_path):
    """Many hub configs of natively supported models (e.g. Phi-3) still carry an auto_map: they load
    with transformers' own class, and the repository's code is never imported."""
    marker = tmp_path / "remote-code-ran"
    folder = with_remote_code(tiny_dir, tmp_path / "native", marker)
    lm = models.load_model(str(folder), device="cpu")
    assert type(lm.model) is transformers.LlamaForCausalLM
    assert not marker.exists()


def calls_in_sources():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(ROOT), node


SAFE_KEYWORDS = {"trust_remote_code": False, "allow_pickle": False, "weights_only": True}


def test_no_source_enables_remote_code_or_unpickling():
    for path, call in calls_in_sources():
        name = ast.unparse(call.func)
        assert name not in ("torch.load", "pickle.load", "pickle.loads", "joblib.load"), f"{path}: {name}"
        for kw in call.keywords:
            if kw.arg in SAFE_KEYWORDS:
                value = kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
                assert value is SAFE_KEYWORDS[kw.arg], f"{path}:{call.lineno}: {kw.arg}={value}"


# --- uploads ---------------------------------------------------------------------------------

BAD_NAMES = ["../../etc/passwd.txt", "/etc/passwd.txt", "a\x00b.txt", "..\\..\\boot.ini.txt",
             "~/.bashrc.txt", "CON.txt", ".txt", "x.txt/../../y.csv"]  # fmt: skip

# Parses an upload under each bad name with an audit hook that records every file the process
# opens or changes; a subprocess, because an audit hook can never be removed again.
AUDIT = """
import json, sys
from core import prompts
prompts.parse_prompts(b"category,text\\nmath,warm\\n", "warm.csv")  # lazy imports (codecs) first
seen = []
events = ("open", "os.remove", "os.rename", "os.mkdir", "os.symlink", "os.truncate", "shutil.copyfile")
sys.addaudithook(lambda event, args: seen.append([event, str(args[0])]) if event in events else None)
names = json.loads(sys.argv[1])
results = []
for name in names:
    try:
        results.append(prompts.parse_prompts(b"category,text\\nmath,hello\\n", name).name)
    except prompts.BricklabError as err:
        results.append("refused: " + err.message)
print(json.dumps({"results": results, "files": seen}))
"""


def test_upload_names_never_touch_the_disk():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = json.dumps(BAD_NAMES)
    proc = subprocess.run([sys.executable, "-c", AUDIT, names], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout)
    assert out["files"] == []  # nothing opened, created, renamed or removed: the name is only a label
    assert out["results"][:2] == ["passwd", "passwd"]
    assert all(r.startswith("refused: ") or (r.isprintable() and "/" not in r) for r in out["results"])


FORMULA_CSV = (
    b"category,text\nmath,=SUM(A1:A3)\nmath,+1+2\nmath,-2+3\nmath,@SUM(1)\nmath,\"=cmd|' /C calc'!A0\"\n"
)
FORMULAS = ["=SUM(A1:A3)", "+1+2", "-2+3", "@SUM(1)", "=cmd|' /C calc'!A0"]


def test_the_capture_page_shows_stores_formula_cells_verbatim_under_a_hostile_name(
    monkeypatch, tmp_path, tiny_dir
):
    db = tmp_path / "upload.duckdb"
    monkeypatch.setenv("BRICKLAB_DB", str(db))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    at = app("1_Capture.py").run()
    at.radio[0].set_value("My own file").run()
    at.file_uploader[0].set_value(("../../etc/passwd.csv", FORMULA_CSV, "text/csv")).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.dataframe[0].value["text"].tolist() == FORMULAS  # shown as text, never evaluated
    assert "**passwd**" in "\n".join(str(c.value) for c in at.caption)
    at.button[0].click().run()
    assert not at.exception
    run = Store(db).require_run(at.session_state["run_id"])
    assert [row[3] for row in Store(db).prompts(run.run_id)] == FORMULAS  # stored verbatim
    after = sorted(p.name for p in tmp_path.rglob("*") if not p.name.startswith("upload.duckdb"))
    assert after == before  # the cache file aside, nothing was written next to it


# --- search text -----------------------------------------------------------------------------

SQL_TEXTS = ["'; DROP TABLE tokens; --", "' OR '1'='1", '" OR 1=1 --', "\\", "%' --", "'", "?", "$1",
             "); DELETE FROM runs; (", "Robert'); DROP TABLE results;--"]  # fmt: skip


@pytest.fixture(scope="module")
def search_store(small_run, tmp_path_factory):
    path, run_id = small_run
    copy = tmp_path_factory.mktemp("search") / "cache.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    yield store, run_id
    store.close()


def table_counts(store: Store) -> list:
    cur = store.cursor()
    tables = [r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
    return [(t, cur.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables]


@pytest.mark.parametrize("text", SQL_TEXTS)
def test_search_text_with_quotes_and_sql_is_only_text(search_store, text):
    store, run_id = search_store
    before = table_counts(store)
    for exact in (True, False):
        assert isinstance(neurons.search_tokens(store, run_id, text, exact=exact), list)
    assert table_counts(store) == before


def test_a_token_with_a_quote_is_found_by_its_text(search_store):
    store, run_id = search_store
    sql = """SELECT t.token, e.layer, e.neuron FROM top_examples e JOIN tokens t
             ON t.run_id = e.run_id AND t.prompt_idx = e.prompt_idx AND t.pos = e.pos
             WHERE e.run_id = ? AND t.token LIKE '%''%' ORDER BY ALL LIMIT 1"""
    token, layer, neuron = store.cursor().execute(sql, [run_id]).fetchone()
    text = neurons.display_token(token).strip()
    assert "'" in text
    found = neurons.search_tokens(store, run_id, text, limit=10_000)
    assert (layer, neuron) in {(r["layer"], r["neuron"]) for r in found}


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_any_search_text_gives_rows_or_a_clear_error(search_store, text):
    store, run_id = search_store
    for exact in (True, False):
        try:
            rows = neurons.search_tokens(store, run_id, text, exact=exact, limit=5)
        except BricklabError as err:
            assert "empty" in err.message and not text.strip()
        else:
            assert len(rows) <= 5 and all(r["hits"] >= 1 for r in rows)


# --- generation length and document size -----------------------------------------------------


def trivial_config(lm):
    info = lm.info
    return configuration.BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, ())


@pytest.fixture
def model_never_runs(tiny_lm, monkeypatch):
    monkeypatch.setattr(tiny_lm.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    return tiny_lm


@pytest.mark.parametrize("n", [0, -1, compare.MAX_NEW_TOKENS + 1, 10**9, True, 2.5, "8", None])
def test_generation_length_outside_the_cap_is_refused_before_the_model_runs(model_never_runs, n):
    with pytest.raises(BricklabError, match=f"at most {compare.MAX_NEW_TOKENS} new tokens"):
        compare.compare(model_never_runs, "Hello", trivial_config(model_never_runs), max_new_tokens=n)


@pytest.mark.parametrize("n", [0, compare.MAX_NEW_TOKENS + 1, 10**9, True])
def test_routed_generation_is_capped_too(model_never_runs, n):
    with pytest.raises(BricklabError, match=f"at most {compare.MAX_NEW_TOKENS} new tokens"):
        tradeoff.routed_run(model_never_runs, None, "Hello", n)


def test_the_cap_bounds_a_real_generation(tiny_lm, monkeypatch):
    """With the cap lowered to 3, three new tokens are generated and a fourth is refused."""
    monkeypatch.setattr(compare, "MAX_NEW_TOKENS", 3)
    result = compare.compare(tiny_lm, "Hello", trivial_config(tiny_lm), max_new_tokens=3)
    assert 1 <= len(result.baseline_tokens) <= 3 and 1 <= len(result.configured_tokens) <= 3
    with pytest.raises(BricklabError, match="at most 3 new tokens"):
        compare.compare(tiny_lm, "Hello", trivial_config(tiny_lm), max_new_tokens=4)


def test_the_pages_offer_no_more_new_tokens_than_the_cap():
    sliders = [
        call for path, call in calls_in_sources()
        if ast.unparse(call.func).endswith("slider") and call.args
        and isinstance(call.args[0], ast.Constant) and "new tokens" in str(call.args[0].value).lower()
    ]  # fmt: skip
    assert len(sliders) >= 2  # the Playground's manual and auto modes
    for call in sliders:
        assert ast.literal_eval(call.args[2]) <= compare.MAX_NEW_TOKENS, ast.unparse(call)


def test_an_oversized_configuration_is_refused_before_parsing():
    text = " " * configuration.MAX_BYTES + "{}"
    with pytest.raises(BricklabError, match="larger than"):
        configuration.loads(text)
