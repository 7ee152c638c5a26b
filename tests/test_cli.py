"""`python -m core`: capture with --limit, the cache hit, runs, --help everywhere, clear error exits."""

import argparse
import re
import runpy
import sys

import pytest

from core import cli


def subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_capture_then_cache_hit_then_runs(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "c.duckdb")
    argv = ["--db", db, "capture", "--model", tiny_dir, "--limit", "7", "--quiet"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    match = re.search(r"run (\w+): captured 7 prompts, ([\d,]+) tokens", first)
    assert match, first
    assert cli.main(argv) == 0
    assert f"run {match.group(1)}: cache hit ({match.group(2)} tokens" in capsys.readouterr().out
    assert cli.main(["--db", db, "runs"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"{match.group(1)}\s+complete\s+\S+\s+7\s+{match.group(2)}", listing), listing


def test_runs_on_an_empty_cache(tmp_path, capsys):
    assert cli.main(["--db", str(tmp_path / "c.duckdb"), "runs"]) == 0
    assert "no runs yet" in capsys.readouterr().out


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_works_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m core")


def test_every_documented_command_exists():
    assert {"capture", "runs", "prepare"} <= set(subcommands())


def test_a_missing_prompt_file_is_a_clear_error_that_creates_nothing(tiny_dir, tmp_path, capsys):
    db = tmp_path / "c.duckdb"
    argv = ["--db", str(db), "capture", "--model", tiny_dir, "--prompts", str(tmp_path / "nope.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The prompt file") and "does not exist" in err
    assert not db.exists()


def test_a_bad_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--db", str(tmp_path / "c.duckdb"), "capture", "--model", str(tmp_path / "none")]) == 2
    assert "error: The model folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_limit_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["capture", "--limit", value])
    assert done.value.code == 2 and "--limit" in capsys.readouterr().err


def test_module_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m core", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("core", run_name="__main__")
    assert done.value.code == 0 and "list cached runs" in capsys.readouterr().out
