"""Command-line interface (`python -m core`): the parser, the global options and error handling.

The commands live beside this file, grouped by concern (capture, bricks, report, export); they
do all the printing, and the rest of core only computes.
"""

from __future__ import annotations

import argparse
import sys

from core.cli import architectures, bricks, capture, doctor, explain, export, prepare, report
from core.errors import BricklabError

# each adds its subcommands with `register`
COMMAND_MODULES = (capture, bricks, report, export, doctor, prepare, architectures, explain)
GLOBAL_TITLE = "global options (before or after the command)"


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_argument_group(GLOBAL_TITLE)
    group.add_argument(
        "--db", default=default, help="DuckDB cache file (default: data/bricklab.duckdb or $BRICKLAB_DB)"
    )
    group.add_argument(
        "--model", default=default,
        help="hub id or local folder, for the commands that load a model: capture (default: the "
        "embedded SmolLM2-135M-Instruct), report (the run's model), apply and prune (the configuration's)",
    )  # fmt: skip
    group.add_argument(
        "--device", default=default, help="cpu or cuda, where a model is loaded (default: cuda when present)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="bricklab: bricks in FFN layers.")
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    for command in {id(c): c for c in sub.choices.values()}.values():  # an alias shares its parser
        # SUPPRESS: an option not written after the command leaves the value given before it.
        _add_global_options(command, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BricklabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; a command may say what it kept
        print(f"interrupted{getattr(args, 'on_interrupt', '')}", file=sys.stderr)
        return 130
