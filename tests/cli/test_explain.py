"""`explain`: a neuron or a brick in words with its score, as text or JSON; clear errors."""

import json
import shutil

import pytest

from core import cli


@pytest.fixture
def db(small_run, tmp_path) -> str:
    shutil.copy(small_run[0], tmp_path / "c.duckdb")
    return str(tmp_path / "c.duckdb")


def test_a_neuron_in_words_with_its_written_tokens(db, tiny_dir, capsys):
    assert cli.main(["explain", "1:7", "--db", db, "--model", tiny_dir]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("neuron 1:7: ") and "promotes" in out[0]
    assert out[1].startswith("score: ") and "held-out prompts" in out[1]
    assert out[2].startswith("promoted: ") and out[3].startswith("suppressed: ")


def test_a_brick_as_json_without_the_model(db, capsys):
    assert cli.main(["explain", "--brick", "coact-L01-00", "--db", db, "--no-model", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["subject"] == "brick coact-L01-00" and got["promoted"] == []
    assert {"text", "score", "trust", "tokens", "n_held_out"} <= set(got)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "Name one neuron"),
        (["1-7"], "LAYER:INDEX"),
        (["9:0", "--no-model"], "does not exist"),
        (["--brick", "nope", "--no-model"], "not a brick id"),
        (["--brick", "coact-L09-00", "--no-model"], "has no brick"),
    ],
)
def test_bad_requests_are_clear_errors(db, capsys, argv, message):
    assert cli.main(["explain", *argv, "--db", db]) == 2
    assert message in capsys.readouterr().err
