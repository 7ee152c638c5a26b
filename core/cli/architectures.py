"""`architectures`: the families bricklab is tested on and what it supports for each (the README's table)."""

from __future__ import annotations

from core import architectures


def register(sub) -> None:
    p = sub.add_parser("architectures", help="list the supported model architectures and what each supports")
    p.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    p.set_defaults(func=cmd_architectures)


def cmd_architectures(args) -> int:
    if args.markdown:
        print(architectures.markdown(), end="")
        return 0
    rows = architectures.rows()
    width = max(len(r.model_type) for r in rows)
    for r in rows:
        runs = "runs" if r.runs == "yes" else r.runs
        print(f"{r.model_type:{width}}  {r.ffn:24}  {runs}; prune: {r.prune}")
    print("\nOther decoder-only models load when their FFN is found from their modules (see the README).")
    return 0
