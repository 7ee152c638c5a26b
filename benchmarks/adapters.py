"""Adapter bricks on the default model: training time and adapter size, recall of the bundled invented
facts with the adapter on and off, the loss change per category of the default prompt set with it on,
and (with --brick) the same with an emergent functional brick switched off at the same time.

The adapter is cached beside --db (trained once per settings); the JSON object on the last line holds
every figure. Run: python benchmarks/adapters.py [--steps 10] [--per-category 8] [--brick knowledge]
`--smoke`: a tiny random model, 1 step, 2 questions, 1 prompt per category, the coding brick, in a
temporary folder.
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import models, prompts
from core.bricks import candidates as bricks
from core.capture import run as capture
from core.configuration import AdapterRef, BrickConfig
from core.live import adapter_train, adapters, evaluate, interventions
from core.store import Store


def category_losses(lm, picked: dict[str, list[str]], scope) -> dict[str, float]:
    texts = [t for group in picked.values() for t in group]
    with scope:
        loss = evaluate.loss_per_prompt(lm, texts)
    bounds = np.cumsum([0, *(len(g) for g in picked.values())])
    return {c: float(np.nanmean(loss[a:b])) for c, a, b in zip(picked, bounds[:-1], bounds[1:], strict=True)}


def change(base: dict, other: dict) -> dict:
    """Per category: loss change in percent."""
    return {c: round(100 * (other[c] / base[c] - 1), 2) for c in base}


def functional_brick(lm, store: Store, prompt_set, label: str):
    """The emergent brick of one category: capture the prompts (cached), form functional bricks."""
    run = capture.capture(lm, prompt_set, store, capture.CaptureConfig())
    found = bricks.compute_bricks(store, run.run_id, bricks.BrickParams(method="functional", stability=False))
    brick = next(b for b in found if b.brick_id.endswith(label))
    return bricks.brick_to_config(brick, lm.info.n_layers, lm.info.d_ff, "off")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=adapter_train.TrainConfig.steps)
    parser.add_argument("--lr", type=float, default=adapter_train.TrainConfig.learning_rate)
    parser.add_argument(
        "--batch-size", type=int, default=adapter_train.TrainConfig.batch_size, help="texts a step"
    )
    parser.add_argument("--per-category", type=int, default=8, help="default prompts per category for losses")
    parser.add_argument("--brick", help="also switch this category's functional brick off (e.g. knowledge)")
    parser.add_argument("--factor", type=float, default=1.0, help="apply the adapter scaled by this factor")
    parser.add_argument("--db", default="/tmp/bricklab-adapter-bench/cache.duckdb")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny random model, 1 step, in a temporary folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.smoke:
        return measure(args, models.load_model(None, device="cpu"))
    import _tiny  # beside this file

    args.steps, args.batch_size, args.per_category, args.brick = 1, 4, 1, args.brick or "coding"
    with tempfile.TemporaryDirectory() as tmp:
        args.db = str(Path(tmp) / "cache.duckdb")
        measure(args, _tiny.model())


def measure(args, lm) -> None:
    """Train the adapter (or take it from beside --db), then recall and losses; prints the JSON line."""
    os.environ["BRICKLAB_DB"] = args.db  # configurations look for adapters beside the cache
    facts = adapter_train.default_facts()
    if args.smoke:  # each question is a generation: two prove the path
        facts = dataclasses.replace(facts, questions=facts.questions[:2])
    folder = Path(args.db).parent / "adapters"
    settings = adapter_train.TrainConfig(steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size)
    trained = adapter_train.train(lm, facts, settings, lambda d, n, m: print(f"  step {d}/{n} {m}"), folder)
    seconds = trained.seconds if not trained.cached else trained.adapter.meta["seconds"]
    size = (folder / f"{trained.sha256}.safetensors").stat().st_size
    print(f"adapter {trained.sha256[:12]}: {trained.adapter.n_params:,} parameters, {size / 1e6:.2f} MB file")
    print(f"training: {seconds:.1f} s for {args.steps} steps ({args.threads} threads)")
    on = [(trained.adapter, args.factor)]
    recall_on, rows_on = adapter_train.recall(lm, facts.questions, on)
    recall_off, rows_off = adapter_train.recall(lm, facts.questions)
    for (q, a, text, hit), (*_, plain, _) in zip(rows_on, rows_off, strict=True):
        print(f"  {'+' if hit else '-'} {q} [{a}]\n      on:  {text!r}\n      off: {plain!r}")
    print(f"fact recall: on (factor {args.factor:g}) {recall_on:.0%}, off {recall_off:.0%}")
    prompt_set = prompts.default_prompt_set().head(args.per_category * 7)
    picked: dict[str, list[str]] = {}
    for p in prompt_set.prompts:
        picked.setdefault(p.category, []).append(p.text)
    started = time.perf_counter()
    plain = category_losses(lm, picked, adapters.applied(lm.model, ()))
    with_adapter = category_losses(lm, picked, adapters.applied(lm.model, on))
    print(f"loss per category, plain -> adapter on ({time.perf_counter() - started:.0f} s):")
    for c in plain:
        print(f"  {c:12} {plain[c]:.3f} -> {with_adapter[c]:.3f} ({change(plain, with_adapter)[c]:+.2f}%)")
    out = {"sha256": trained.sha256, "train_seconds": round(seconds, 1), "steps": args.steps}
    out |= {
        "threads": args.threads,
        "file_bytes": size,
        "params": trained.adapter.n_params,
        "factor": args.factor,
    }
    out |= {"recall_on": recall_on, "recall_off": recall_off, "loss_plain": plain}
    out |= {"loss_change_pct": change(plain, with_adapter)}
    if args.brick:
        out |= both(lm, facts, trained, args, prompt_set, picked, plain)
    print(json.dumps(out))


def both(lm, facts, trained, args, prompt_set, picked, plain) -> dict:
    """An emergent brick off and the adapter on, through one configuration (interventions.configured)."""
    store = Store(args.db)
    brick = functional_brick(lm, store, prompt_set, args.brick)
    info, meta = lm.info, trained.adapter.meta
    mode = "on" if args.factor == 1 else "scale"
    ref = AdapterRef(
        "facts", trained.sha256, meta["layers"], meta["modules"], meta["rank"], mode, args.factor
    )
    config = BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, (brick,), adapters=(ref,))
    loss = category_losses(lm, picked, interventions.configured(lm, config))
    with interventions.configured(lm, config):
        recall, _ = adapter_train.recall(lm, facts.questions)
    size = sum(map(len, brick.neurons.values()))
    print(f"{brick.name} off ({size} neurons) + adapter on: recall {recall:.0%}")
    for c in plain:
        print(f"  {c:12} {plain[c]:.3f} -> {loss[c]:.3f} ({change(plain, loss)[c]:+.2f}%)")
    store.close()
    return {"brick": brick.name, "both_recall": recall, "both_loss_change_pct": change(plain, loss)}


if __name__ == "__main__":
    main()
