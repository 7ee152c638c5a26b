"""The parser: global options before or after any command, --help everywhere, `python -m core`."""

import argparse
import runpy
import sys

import pytest

from core import cli


def subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_works_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m core") and "--db DB" in out and "--device DEVICE" in out


def test_every_documented_command_exists():
    expected = {"capture", "merge", "runs", "prepare", "doctor", "bricks", "map"}
    expected |= {"config", "report", "apply", "prune", "architectures"}
    expected |= {"explain"}
    expected |= {"prepare-run", "setup-model"}  # "prepare" is setup-model's old name
    assert set(subcommands()) == expected


ARGS = {"merge": ["s.duckdb"], "config": ["-o", "c.json"], "apply": ["c.json", "--prompt", "Hi"]}
ARGS["prune"] = ["c.json", "out"]


@pytest.mark.parametrize("command", subcommands())
def test_global_options_go_before_or_after_the_command(command):
    parse = cli.build_parser().parse_args
    rest = ARGS.get(command, [])
    before = parse(["--db", "a.duckdb", "--model", "m", "--device", "cpu", command, *rest])
    after = parse([command, *rest, "--db", "a.duckdb", "--model", "m", "--device", "cpu"])
    for args in (before, after):
        assert (args.db, args.model, args.device) == ("a.duckdb", "m", "cpu")
    assert parse(["--db", "a.duckdb", command, *rest, "--db", "b.duckdb"]).db == "b.duckdb"  # the last wins
    assert parse([command, *rest]).db is None


def test_module_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m core", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("core", run_name="__main__")
    assert done.value.code == 0 and "list cached runs" in capsys.readouterr().out
