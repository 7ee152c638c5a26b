"""`bricks`, `map` and `config` on the tiny run, and on a run without categories (a TXT prompt file)."""

import json
import re
import shutil

import pytest

from core import cli, configuration
from core.store import Store


@pytest.fixture
def db(small_run, tmp_path) -> tuple[str, str]:
    """(path, run id) of a private copy of the tiny run."""
    path, run_id = small_run
    shutil.copy(path, tmp_path / "copy.duckdb")
    return str(tmp_path / "copy.duckdb"), run_id


@pytest.fixture(scope="module")
def txt_run(tiny_dir, tmp_path_factory) -> tuple[str, str]:
    """(path, run id) of a capture of a TXT prompt file: one prompt a line, no categories."""
    folder = tmp_path_factory.mktemp("txt")
    lines = [
        f"Sentence number {i} talks about {topic}." for i, topic in enumerate(["cats", "tax", "rain"] * 4)
    ]
    (folder / "prompts.txt").write_text("\n".join(lines) + "\n")
    db = str(folder / "c.duckdb")
    argv = ["capture", "--db", db, "--model", tiny_dir, "--prompts", str(folder / "prompts.txt"), "--quiet"]
    assert cli.main(argv) == 0
    store = Store(db)
    run_id = store.require_run().run_id
    store.close()
    return db, run_id


def test_the_table_prints_shares_and_the_layer_table(db, capsys):
    path, run_id = db
    assert cli.main(["--db", path, "bricks", "--run", run_id, "--method", "functional"]) == 0
    out = capsys.readouterr().out
    assert "functional" in out and "random" in out and "5 per mille" in out
    assert cli.main(["--db", path, "bricks", "--run", run_id, "--size", "0"]) == 2
    assert "size 0" in capsys.readouterr().err


def test_json_is_all_of_stdout_and_holds_ids_and_neurons(db, capsys):
    path, run_id = db
    assert cli.main(["bricks", "--db", path, "--method", "coact", "--size", "48", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["run_id"], doc["n_layers"], doc["d_ff"]) == (run_id, 2, 96)
    ids = [b["id"] for b in doc["bricks"]]
    assert ids == ["coact-L00-00", "coact-L00-01", "coact-L01-00", "coact-L01-01"]
    first = doc["bricks"][0]
    assert first["size"] == 48 and first["layers"] == [0] and list(first["neurons"]) == ["0"]
    assert {"label", "stability", "top_tokens", "p_values"} <= set(first)
    every = sorted(i for b in doc["bricks"][:2] for i in b["neurons"]["0"])
    assert every == list(range(96))  # a partition of layer 0


def test_config_writes_what_apply_and_prune_load(db, tiny_lm, tmp_path, capsys):
    path, run_id = db
    out = tmp_path / "my.json"
    argv = ["config", "--db", path, "--brick", "coact-L00-01", "--brick", "coact-L01-00", "--mode", "scale"]
    argv += ["--factor", "0.5", "--keep", "coact-L01-01", "--note", "three", "-o", str(out)]
    assert cli.main(argv) == 0
    assert f"wrote {out}: 3 bricks (off 1, scale 1, keep 1), 96 neurons" in capsys.readouterr().out
    config = configuration.load(out, tiny_lm.info)
    got = [(b.name, b.mode, b.factor) for b in config.bricks]
    assert got == [
        ("coact-L00-01", "off", 1.0),
        ("coact-L01-00", "scale", 0.5),
        ("coact-L01-01", "keep", 1.0),
    ]
    assert config.source == {"run_id": run_id} and config.note == "three"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "No bricks chosen"),
        (["--brick", "coact-L00-01", "--mode", "scale"], "needs --factor"),
        (["--brick", "coact-L00-01", "--factor", "0.5"], "takes no --factor"),
        (["--brick", "coact-L09-00"], "has no brick coact-L09-00"),
        (["--brick", "oops"], "Cannot tell the method of brick oops"),
        (["--brick", "coact-L00-01", "--keep", "coact-L00-01"], "chosen twice"),
    ],
)
def test_config_refuses_unclear_choices_and_writes_nothing(db, tmp_path, extra, message, capsys):
    out = tmp_path / "my.json"
    assert cli.main(["config", "--db", db[0], *extra, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_mode_before_any_brick_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["config", "--mode", "off", "--brick", "coact-L00-00", "-o", "x.json"])
    assert done.value.code == 2 and "comes before any --brick" in capsys.readouterr().err


def test_a_run_without_categories_forms_coact_bricks_without_labels(txt_run, capsys):
    path, run_id = txt_run
    assert cli.main(["bricks", "--db", path, "--method", "coact"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"coact\s+6\s+32\.0\s+-\s+-", out) and "labels need prompt categories" in out
    assert cli.main(["bricks", "--db", path, "--method", "coact", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["categories"] == [] and len(doc["bricks"]) == 6
    assert all(b["label"] is None and b["p_values"] == {} for b in doc["bricks"])
    assert cli.main(["bricks", "--db", path, "--method", "functional"]) == 2
    assert "Functional bricks need prompt categories" in capsys.readouterr().err


def test_a_run_without_categories_forms_map_bricks_and_lists_its_clusters(txt_run, capsys):
    path, run_id = txt_run
    assert cli.main(["bricks", "--db", path, "--method", "map", "--no-stability", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(b["method"] == "map" and b["label"] is None for b in doc["bricks"])
    assert cli.main(["map", "--db", path, "--min-cluster-size", "5"]) == 0
    out = capsys.readouterr().out
    assert f"run {run_id}: 192 neurons" in out and "the run has no categories" in out


def test_map_lists_the_clusters(db, capsys):
    path, run_id = db
    args = ["--db", path, "map", "--run", run_id, "--min-cluster-size", "5"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"run {run_id}: 192 neurons" in out and "noise" in out
    assert cli.main([*args[:-1], "1"]) == 2
