"""`doctor`: check a cache file run by run and copy what still reads back into a fresh file."""

from __future__ import annotations

from pathlib import Path

from core import settings
from core.store import doctor


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check the cache file; copy its readable runs into a fresh file")
    p.add_argument("--out", help="the fresh file for the readable runs (default: beside it, .recovered)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    path = Path(args.db) if args.db else settings.db_path()
    found = doctor.check(path)
    print(f"cache: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if found.cause:
        print(f"nothing can be read: {found.cause}")
        print(
            "no run can be recovered: move the file aside (bricklab then starts a new one) and capture again"
        )
        return 1
    for run in found.runs:
        state = "readable" if run.readable else "damaged: cannot read " + ", ".join(run.bad_tables)
        results = f"{len(run.results)} results readable" + (
            f", {run.bad_results} not" if run.bad_results else ""
        )
        print(f"run {run.run_id} ({run.status}): {state}; {results}")
    if found.healthy:
        print("every run and result reads back: nothing to do")
        return 0
    if not any(run.readable for run in found.runs):
        print("no run reads back whole: nothing to copy; move the file aside and capture again")
        return 1
    out = Path(args.out) if args.out else path.with_suffix(".recovered" + path.suffix)
    copied = doctor.recover(found, out)
    print(f"copied {copied} readable run(s) and their readable results into {out}")
    print("results left behind are computed again when asked for; damaged runs need a new capture")
    print(f"use it with --db {out} (or BRICKLAB_DB), or move it in place of the damaged file")
    return 1
