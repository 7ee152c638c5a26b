"""`apply` and `prune`: a brick configuration file used on its model, live beside the plain model,
or made permanent as a smaller model folder."""

from __future__ import annotations

from core import configuration, export, models
from core.live import compare
from core.store import Store


def register(sub) -> None:
    p = sub.add_parser("apply", help="generate with and without a brick configuration, side by side")
    p.add_argument("config", help="brick configuration JSON")
    p.add_argument(
        "--prompt", required=True, help="the prompt (wrapped in the chat template when there is one)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    _run_arg(p)
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("prune", help="write a smaller model with the disabled FFN neurons removed")
    p.add_argument("config", help="brick configuration JSON")
    p.add_argument("out_dir", help="new folder for the pruned Hugging Face model")
    _run_arg(p)
    p.set_defaults(func=cmd_prune)


def _run_arg(p) -> None:
    p.add_argument(
        "--run", help="run whose mean activations 'mean' bricks use (default: the configuration's run)"
    )


def _load(args):
    """(model, validated configuration, store or None, run id or None) for a command; the store
    is opened only for 'mean' bricks, which need a run's mean activations."""
    peek = configuration.load(args.config)
    lm = models.load_model(args.model or peek.model_id, device=args.device)
    config = configuration.load(args.config, lm.info)
    if not any(brick.mode == "mean" for brick in config.bricks):
        return lm, config, None, None
    store = Store(args.db)
    run_id = args.run or (config.source or {}).get("run_id")  # the run the bricks came from
    if run_id is None:
        mine = [r for r in store.runs() if r.complete and r.fingerprint == lm.info.fingerprint]
        run_id = mine[0].run_id if mine else None
    return lm, config, store, run_id


def cmd_apply(args) -> int:
    lm, config, store, run_id = _load(args)
    try:
        result = compare.compare(
            lm,
            args.prompt,
            config,
            args.max_new_tokens,
            store,
            run_id,
            chat_template=not args.no_chat_template,
        )
    finally:
        if store is not None:
            store.close()
    off = round((1 - result.active_share) * lm.info.n_neurons)
    print(f"active FFN neurons: {result.active_share:.1%} ({off:,} of {lm.info.n_neurons:,} not computed)")
    where = "none (identical)" if result.first_divergence is None else f"token {result.first_divergence}"
    print(f"first divergent token: {where}")
    print(f"KL(baseline || configured): mean {result.mean_kl:.4f} nats, max {max(result.kl, default=0):.4f}")
    print(f"\n{'#':>4}  {'baseline':24}  {'configured':24}  {'KL':>8}")
    for i in range(max(len(result.baseline_tokens), len(result.configured_tokens))):
        mark = "*" if i == result.first_divergence else " "
        kl = f"{result.kl[i]:8.4f}" if i < len(result.kl) else ""
        print(f"{i:>3}{mark}  {_cell(result.baseline_pieces, i)}  {_cell(result.configured_pieces, i)}  {kl}")
    print(f"\nbaseline:   {result.baseline_text!r}\nconfigured: {result.configured_text!r}")
    return 0


def _cell(pieces: tuple[str, ...], i: int) -> str:
    text = repr(pieces[i]) if i < len(pieces) else ""
    return f"{text[:24]:24}"


def cmd_prune(args) -> int:
    lm, config, store, run_id = _load(args)
    try:
        r = export.prune(lm, config, args.out_dir, store, run_id)
    finally:
        if store is not None:
            store.close()
    layers = f"layers keep {min(r.kept):,}..{max(r.kept):,} neurons"
    print(f"wrote {r.out_dir}: FFN width {r.d_ff:,} -> {r.width:,} ({layers}; narrower ones are zero-padded)")
    if r.fixed_width:
        print(
            f"a '{lm.info.model_type}' model has no FFN width setting: the removed neurons are zeroed in "
            "place (the same outputs in a folder plain transformers loads, but no smaller)"
        )
    share = r.params_saved / r.params_before
    print(f"parameters: {r.params_before:,} -> {r.params_after:,} (saved {r.params_saved:,}, {share:.1%})")
    print(
        f"weights: {r.bytes_before / 1e6:,.1f} MB -> {r.bytes_after / 1e6:,.1f} MB "
        f"(saved {r.bytes_saved / 1e6:,.1f} MB; model.safetensors is {r.file_bytes / 1e6:,.1f} MB)"
    )
    ideal = r.params_before - r.params_per_layer_widths
    if ideal > r.params_saved:
        print(
            f"with a width per layer (which plain transformers cannot load for this architecture) "
            f"it would save {ideal:,} parameters"
        )
    if r.folded_means:
        print("'mean' bricks are folded into the down projection's bias")
    return 0
