"""`explain`: a neuron's or a brick's one-line description, its score on held-out prompts, and the
tokens it writes (`python -m core explain 15:100`, `python -m core explain --brick coact-L03-07`)."""

from __future__ import annotations

import json

from core import models
from core.bricks import candidates, explain, vocab
from core.errors import BricklabError
from core.store import Store


def register(sub) -> None:
    p = sub.add_parser("explain", help="a neuron or brick in words, scored on held-out prompts")
    p.add_argument("neuron", nargs="?", help="LAYER:INDEX, e.g. 15:100")
    p.add_argument("--brick", help="a brick id instead, e.g. coact-L03-07 (its method from the id)")
    p.add_argument("--run", help="run id (default: the newest complete run)")
    p.add_argument(
        "--size", type=int, default=candidates.BrickParams.size, help="coact bricks: neurons per brick (32)"
    )
    p.add_argument("--no-model", action="store_true", help="leave out the promoted tokens (no model load)")
    p.add_argument("--json", action="store_true", help="print only one JSON object")
    p.set_defaults(func=cmd_explain)


def parse_neuron(text: str) -> tuple[int, int]:
    try:
        layer, index = (int(part) for part in text.split(":"))
    except ValueError:
        raise BricklabError(f"'{text}' is not a neuron.", "Write it as LAYER:INDEX, e.g. 15:100.") from None
    return layer, index


def _brick(store: Store, run_id: str, brick_id: str, size: int) -> candidates.Candidate:
    method = brick_id.split("-", 1)[0]
    if method not in candidates.METHODS:
        raise BricklabError(
            f"'{brick_id}' is not a brick id.",
            "Use an id that `python -m core bricks` lists, e.g. coact-L03-07.",
        )
    params = candidates.BrickParams(method=method, size=size)
    found = {b.brick_id: b for b in candidates.compute_bricks(store, run_id, params)}
    if brick_id not in found:
        raise BricklabError(
            f"Run '{run_id}' has no brick '{brick_id}'.", "List them with `python -m core bricks`."
        )
    return found[brick_id]


def cmd_explain(args) -> int:
    if (args.neuron is None) == (args.brick is None):
        raise BricklabError(
            "Name one neuron (LAYER:INDEX) or one --brick.", "E.g. `python -m core explain 15:100`."
        )
    store = Store(args.db)
    try:
        run = store.require_run(args.run)
        lm = None
        if not args.no_model:
            default = None if run.model_id == models.DEFAULT_MODEL else run.model_id
            lm = models.load_model(args.model or default, device=args.device)
            models.check_match(
                run, lm.info, f"Run '{run.run_id}'", "Give --model the run's model, or --no-model."
            )
        writes = None
        if args.brick:
            brick = _brick(store, run.run_id, args.brick, args.size)
            described = explain.explain_brick(store, run.run_id, brick, lm)
        else:
            layer, index = parse_neuron(args.neuron)
            described = explain.explain_neuron(store, run.run_id, layer, index, lm)
            writes = None if lm is None else vocab.neuron_tokens(lm, layer * run.d_ff + index, 10, store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(described.to_dict() | ({"writes": writes} if writes else {})))
        return 0
    score = "n/a" if described.trust == "none" else f"{described.score:.2f} ({described.trust})"
    print(f"{described.subject}: {described.text}")
    print(f"score: {score}, Pearson r of a token-match simulation on {described.n_held_out} held-out prompts")
    for side, pairs in (writes or {}).items():
        print(f"{side}: " + "  ".join(repr(text) for text, _ in pairs))
    return 0
