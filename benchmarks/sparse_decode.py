"""Sparse decoding (as in TEAL): batch-1 greedy tokens/s of dense against calibrated activation
sparsity at several shares, and the default model's held-out loss at those shares.

Settings: "dense" (the model's own MLP: cuBLAS on CUDA; attention projections cuBLAS inside one compiled
block); "dense compiled" (the MLP through torch.compile); "dense kernel" (every FFN input and neuron
through the sparse Triton kernels with zero thresholds: the control separating what skipping saves from
what the kernel costs) and "dense kernel+attn" (the attention projections too); "down S" (neurons
|a| < tau * max|a| skipped by the down projection); "teal S" (also FFN inputs |x| < t_x skipped by gate
and up); "teal+attn S" (also the attention projections' inputs: q/k/v skip |x| < t_qkv of the attention
input, o skips |y| < t_o of the attention output), S the share skipped in every layer and product.
FFN settings are core.live.sparse.Threshold, the layer function the app runs; sparse projections are
core.routing.decode.SparseProjections (the Triton kernels; on the CPU the same masks computed densely).
Thresholds: tau per layer from the |a| / max histogram (capture's statistic: from the run's cache for
the loss, from calibration tokens for speed); t_x, t_qkv and t_o per-layer quantiles of |input| on
calibration tokens (a capture stores no histograms of the attention inputs).

Speed: one decode harness for every setting, so only the products differ: a static KV cache and a step
of fixed shapes (attention over the whole cache, later positions masked) that is captured once per
setting as a CUDA graph and replayed (on the CPU: run eagerly). Repetitions interleave the settings (the
order rotates); tokens/s is the median over repetitions. Speed does not depend on weight values, so
random weights of Llama-3-8B's shape stand in for it (`--shape llama3-8b`, CUDA). `--sweep` first times
the kernels' launch shapes per product (benchmarks/sparse_kernels.py, Llama-3-8B's shapes) and decodes
with the fastest. The harness's dense greedy tokens are checked against transformers' own generate
(`matches_hf`).

`--parts` adds settings that take a part out of the dense token (the FFN, the attention projections,
both), and times the unembedding alone: what each part of a token costs, by difference ("parts").

Loss: mean next-token loss of the run's held-out prompts with every token sparse, relative to dense
(needs the cache: not with --shape); attention thresholds from the |inputs| of other prompts of the run.
Last line: one JSON object.
Measured (benchmarks/results/sparse-decode-h200-2026-12-03b.json): Llama-3-8B shape on an H200, dense
193 tokens/s; teal+attn 25/40/50% 1.23/1.35/1.44x (teal, FFN only, 1.18/1.26/1.32x), short of TEAL's
1.53/1.8x. The earlier result (-2026-12-03.json, FFN only, older kernels): 1.16/1.24/1.29x.
Run: python benchmarks/sparse_decode.py [--smoke] [--shape llama3-8b --device cuda --no-loss [--sweep]]
    [--db PATH] [--run RUN_ID] [--tokens N] [--reps N] [--per-category N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from core import models
from core.live import sparse
from core.routing import decode, thresholds
from core.routing.decode import Decoder, Runner

SHARES = (0.25, 0.4, 0.5)
SHAPES = {  # as benchmarks/gpu_capture.py (not imported: it needs the cache's packages)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
}  # fmt: skip


def _mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Recording(decode.Projections):
    """Dense attention projections that keep |input| of q/k/v and of o per layer (calibration)."""

    def __init__(self, dec: Decoder):
        super().__init__(dec)
        self.seen: list[tuple[list, list]] = [([], []) for _ in dec.layers]

    def qkv(self, layer, x):
        self.seen[layer][0].append(x.detach().abs().float().reshape(1, -1).cpu())
        return super().qkv(layer, x)

    def o(self, layer, y):
        self.seen[layer][1].append(y.detach().abs().float().reshape(1, -1).cpu())
        return super().o(layer, y)


class Masked(decode.Projections):
    """The sparse projections' computation done densely (inputs under the thresholds zeroed): the
    stand-in where the kernels cannot run (the CPU)."""

    def __init__(self, dec: Decoder, t_qkv, t_o):
        super().__init__(dec)
        self.t_qkv, self.t_o = [float(t) for t in t_qkv], [float(t) for t in t_o]

    def qkv(self, layer, x):
        return super().qkv(layer, x.masked_fill(x.abs() < self.t_qkv[layer], 0.0))

    def o(self, layer, y):
        return super().o(layer, y.masked_fill(y.abs() < self.t_o[layer], 0.0))


class Without(decode.Projections):
    """Attention projections that compute nothing (zeros of their shapes, made once): a token without
    them, beside one with them, says what they cost (--parts)."""

    def __init__(self, dec: Decoder):
        super().__init__(dec)
        _, wqkv, wo, _ = dec.weights[0]
        self.q = wqkv.new_zeros(1, wqkv.shape[0])
        self.y = wo.new_zeros(1, wo.shape[0])

    def qkv(self, layer, x):
        return self.q

    def o(self, layer, y):
        return self.y


PARTS = ("dense split", "no ffn", "no projections", "neither")  # part_settings' names, parts' inputs


def part_settings(model, dec: Decoder) -> dict:
    """--parts: the dense token with a part taken out, name -> (ffn, projections) as `settings`.
    "dense split" computes the attention projections between the compiled parts (as the sparse settings
    do) with cuBLAS; "no projections" and "neither" skip them there, "no ffn" and "neither" skip the FFN
    (a zero residual, made once). What is left of "neither" is attention itself, the norms, the
    embedding, the unembedding and the small kernels between them."""
    blocks = models.blocks(model)
    zero = torch.zeros(1, 1, model.config.hidden_size, device=dec.device, dtype=dec.dtype)
    mlp, none = (lambda i, x: blocks[i].mlp(x)), (lambda i, x: zero)
    return {"dense split": (mlp, decode.Projections(dec)), "no ffn": (none, None),
            "no projections": (mlp, Without(dec)), "neither": (none, Without(dec))}  # fmt: skip


def unembedding_ms(dec: Decoder, reps: int) -> float:
    """Milliseconds of the last norm, the unembedding and the argmax of one token (a CUDA graph of 16 on
    CUDA), median of reps."""
    model = dec.model
    h = torch.randn(1, model.config.hidden_size, device=dec.device, dtype=dec.dtype)
    out = torch.zeros(1, dtype=torch.long, device=dec.device)

    def step():
        out.copy_(model.lm_head(decode._rms(h, model.model.norm.weight, dec.eps)).view(-1).argmax().view(1))

    run, n = step, 1
    if dec.device.type == "cuda":
        for _ in range(3):
            step()
        graph, n = torch.cuda.CUDAGraph(), 16
        with torch.cuda.graph(graph):
            for _ in range(n):
                step()
        run = graph.replay
    times = []
    for _ in range(reps):
        decode.sync(dec.device)
        t0 = time.perf_counter()
        run()
        decode.sync(dec.device)
        times.append((time.perf_counter() - t0) * 1000 / n)
    return statistics.median(times)


def parts(seconds: dict, tokens: int, unembedding: float) -> dict:
    """Milliseconds a token of each part of the dense token, by difference of the --parts settings."""
    ms = {name: 1000 * statistics.median(times) / tokens for name, times in seconds.items()}
    return {
        "token_ms": {name: round(ms[name], 3) for name in ("dense", *PARTS)},
        "ffn_ms": round(ms["dense"] - ms["no ffn"], 3),
        "projections_ms": round(ms["dense split"] - ms["no projections"], 3),
        "split_ms": round(ms["dense split"] - ms["dense"], 3),  # what computing them apart costs
        "unembedding_ms": round(unembedding, 3),
        "rest_ms": round(ms["neither"] - unembedding, 3),
    }


def settings(model, dec: Decoder, cal: dict, shares, kernel: bool) -> dict:
    """name -> (ffn(layer, x), the attention projections or None) for the decode harness."""
    blocks = models.blocks(model)
    ffns = [sparse.ffn(model, layer) for layer in range(len(blocks))]
    cuda = ffns[0].gate.is_cuda
    if kernel and cuda:
        for f in ffns:  # pack before any capture: the copies outlive every graph
            sparse.packed(f)
    out = {"dense": (lambda i, x: blocks[i].mlp(x), None)}
    if kernel and cuda:  # the dense MLP fused as well as torch.compile can: a stronger baseline
        mlp = torch.compile(_mlp, dynamic=False)
        out["dense compiled"] = (lambda i, x: mlp(x, ffns[i].gate, ffns[i].up, ffns[i].down.weight), None)

    def threshold(taus, txs):
        fns = [sparse.Threshold(float(taus[i]), float(txs[i])) for i in range(len(blocks))]
        return lambda i, x: fns[i](ffns[i], x)

    def projections(t_qkv, t_o):
        return decode.SparseProjections(dec, t_qkv, t_o) if cuda else Masked(dec, t_qkv, t_o)

    zeros = np.zeros(len(blocks))
    if kernel:
        out["dense kernel"] = (threshold(zeros, zeros), None)
        out["dense kernel+attn"] = (threshold(zeros, zeros), projections(zeros, zeros))
    for s in shares:
        out[f"down {s:.0%}"] = (threshold(cal["tau"][s], zeros), None)
        out[f"teal {s:.0%}"] = (threshold(cal["tau"][s], cal["t_x"][s]), None)
        out[f"teal+attn {s:.0%}"] = (threshold(cal["tau"][s], cal["t_x"][s]), projections(*cal["attn"][s]))
    return out


def calibrate(dec: Decoder, prompt: list[int], n: int, shares) -> dict:
    """tau, t_x and the attention inputs' (t_qkv, t_o) per share from a dense greedy decode of n tokens
    after prompt (all layers)."""
    recorders = [thresholds.Recorder() for _ in dec.layers]
    ffns = [sparse.ffn(dec.model, i) for i in range(len(dec.layers))]
    attention = Recording(dec)
    Runner(dec, lambda i, x: recorders[i](ffns[i], x), graph=False, projections=attention).generate(prompt, n)
    hist = np.stack([r.hist for r in recorders])
    return {"tau": {s: thresholds.relative(hist, s) for s in shares},
            "t_x": {s: thresholds.input_thresholds(recorders, s) for s in shares},
            "attn": {s: thresholds.attention_thresholds(attention.seen, s) for s in shares}}  # fmt: skip


def realized(dec: Decoder, prompt: list[int], cal: dict, shares, n: int) -> dict:
    """The shares of FFN inputs and neurons actually under the thresholds over n decoded tokens (dense)."""
    ffns = [sparse.ffn(dec.model, i) for i in range(len(dec.layers))]
    seen = []

    def ffn(i, x):
        a = ffns[i].activations(x).float()
        seen.append((i, x.float().abs().reshape(-1), a.abs().reshape(-1)))
        return ffns[i].down(ffns[i].activations(x))

    Runner(dec, ffn, graph=False).generate(prompt, n)
    out = {}
    tau, t_x = cal["tau"], cal["t_x"]
    for s in shares:
        xs = [float((x < t_x[s][i]).float().mean()) for i, x, _ in seen]
        neurons = [float((a < tau[s][i] * a.max()).float().mean()) for i, _, a in seen]
        out[f"{s:.0%}"] = {"inputs_skipped": float(np.mean(xs)), "neurons_skipped": float(np.mean(neurons))}
    return out


def sweep(device) -> dict:
    """benchmarks/sparse_kernels.py's timing of every launch shape per product (Llama-3-8B's shapes);
    sets sparse_gpu.TILES to the fastest (down: the faster inside the whole FFN)."""
    import sparse_kernels  # beside this file

    from core.kernels import sparse_gpu

    report = {name: sparse_kernels.product(name, False, device) for name in sparse_kernels.PRODUCTS}
    report["ffn"] = sparse_kernels.ffn(report, device)
    chosen = {name: report[name]["chosen"] for name in sparse_kernels.PRODUCTS} | {
        "down": report["ffn"]["chosen_down"]
    }
    sparse_gpu.TILES = sparse_gpu.Tiles(
        **{name: sparse_gpu.Launch(**launch) for name, launch in chosen.items()}
    )
    report["chosen"] = chosen
    return report


def speed(lm, args, shares) -> dict:
    model, device = lm.model, next(lm.model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist() if lm.tokenizer is None else (
        lm.tokenizer("The history of mathematics begins with counting.")["input_ids"][: args.prompt]
    )  # fmt: skip
    dec = Decoder(
        model,
        len(prompt) + max(args.tokens, args.calibrate, args.check_tokens) + 4,
        compile=device.type == "cuda",
    )
    report = {"sweep": sweep(device)} if args.sweep else {}
    started = time.perf_counter()
    cal = calibrate(dec, prompt, args.calibrate, shares)
    report["calibrate_s"] = time.perf_counter() - started
    cuda = device.type == "cuda"
    chosen = settings(model, dec, cal, shares, kernel=cuda or args.smoke)
    if args.parts:
        chosen |= part_settings(model, dec)
    runners = {name: Runner(dec, fn, graph=cuda, projections=projections)
               for name, (fn, projections) in chosen.items()}  # fmt: skip
    report["realized"] = realized(dec, prompt, cal, shares, args.check_tokens)
    eager, _ = Runner(dec, runners["dense"].ffn, graph=False).generate(prompt, args.check_tokens)
    graphed, _ = runners["dense"].generate(prompt, args.check_tokens)
    report["graph_matches_eager"] = graphed == eager
    report["matches_hf"] = hf_greedy(model, prompt, args.check_tokens) == eager
    seconds = decode.interleaved(runners, prompt, args.tokens, args.reps)
    dense = args.tokens / statistics.median(seconds["dense"])
    best_dense = max(args.tokens / statistics.median(seconds[n]) for n in seconds if n.startswith("dense"))
    rows = []
    for name, times in seconds.items():
        tps = args.tokens / statistics.median(times)
        share = next((s for s in shares if name.endswith(f" {s:.0%}")), 0.0)
        spread = (max(times) - min(times)) / statistics.median(times)
        rows.append({"name": name, "share": share, "tokens_per_s": round(tps, 2),
                     "speedup": round(tps / dense, 3), "speedup_vs_best_dense": round(tps / best_dense, 3),
                     "spread": round(spread, 3)})  # fmt: skip
        print(rows[-1], flush=True)
    if args.parts:
        report["parts"] = parts(seconds, args.tokens, unembedding_ms(dec, args.reps))
        print(report["parts"], flush=True)
    mean = lambda v: float(np.mean(v))  # noqa: E731
    report |= {"settings": rows, "dense_tokens_per_s": round(dense, 2), "graphs": cuda,
               "tiles": {k: v.__dict__ for k, v in _tiles().__dict__.items()} if cuda else None,
               "tau_mean": {f"{s:.0%}": mean(cal["tau"][s]) for s in shares},
               "t_x_mean": {f"{s:.0%}": mean(cal["t_x"][s]) for s in shares},
               "t_qkv_mean": {f"{s:.0%}": mean(cal["attn"][s][0]) for s in shares},
               "t_o_mean": {f"{s:.0%}": mean(cal["attn"][s][1]) for s in shares}}  # fmt: skip
    return report


def _tiles():
    from core.kernels import sparse_gpu

    return sparse_gpu.TILES


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def loss(lm, store, run_id: str, per_category: int, shares) -> dict:
    """Held-out loss relative to dense per setting; tau from the run's histograms."""
    from core.live import evaluate
    from core.routing import tradeoff

    texts = tradeoff.held_out(store, run_id, per_category)
    fit = [t for t in (row[3] for row in store.prompts(run_id)) if t not in set(texts)][: 2 * per_category]
    ids = [lm.tokenizer(t)["input_ids"][:128] for t in fit]
    recorders = thresholds.calibrate(lm, ids)
    attention = thresholds.calibrate_attention(lm, ids)
    dense = float(np.nanmean(evaluate.loss_per_prompt(lm, texts)))
    out = {"n_prompts": len(texts), "dense_loss": dense, "settings": []}
    for s in shares:
        tau = thresholds.from_run(store, run_id, s)
        for name, t_x in (("down", None), ("teal", thresholds.input_thresholds(recorders, s))):
            with sparse.sparse(lm.model, thresholds.layer_functions(tau, t_x)):
                value = float(np.nanmean(evaluate.loss_per_prompt(lm, texts)))
            out["settings"].append({"name": f"{name} {s:.0%}", "loss": value, "loss_ratio": value / dense})
            print(out["settings"][-1], flush=True)
        functions = thresholds.attention_functions(*thresholds.attention_thresholds(attention, s))
        t_x = thresholds.input_thresholds(recorders, s)
        with (
            sparse.sparse(lm.model, thresholds.layer_functions(tau, t_x)),
            thresholds.attention_inputs(lm.model, functions),
        ):
            value = float(np.nanmean(evaluate.loss_per_prompt(lm, texts)))
        out["settings"].append({"name": f"teal+attn {s:.0%}", "loss": value, "loss_ratio": value / dense})
        print(out["settings"][-1], flush=True)
    return out


def random_model(shape: str, device: str) -> models.LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).eval()
    finally:
        torch.set_default_dtype(default)
    return models.LoadedModel(model, None, models.describe(model, f"random-{shape}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model and its fresh run, on the CPU")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (speed only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-loss", action="store_true", help="speed only")
    p.add_argument("--no-speed", action="store_true", help="loss only")
    p.add_argument("--sweep", action="store_true", help="time the kernels' launch shapes first (CUDA)")
    p.add_argument("--db", help="the cache for the loss (default: BRICKLAB_DB or data/bricklab.duckdb)")
    p.add_argument("--run", help="the run (default: the latest complete one)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens timed per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--calibrate", type=int, default=64, help="tokens decoded to calibrate speed")
    p.add_argument("--check-tokens", type=int, default=16, help="tokens compared with transformers' generate")
    p.add_argument("--per-category", type=int, default=4, help="held-out prompts per category for the loss")
    p.add_argument("--parts", action="store_true", help="also time the dense token's parts")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    shares = SHARES
    report = {"shares": list(shares)}
    if args.smoke:
        import _tiny  # beside this file

        args.tokens, args.reps, args.calibrate, args.check_tokens, args.per_category = 4, 2, 8, 4, 1
        lm = _tiny.model()
        report["speed"] = speed(lm, args, shares)
        with _tiny.opened_run(lm) as (store, run_id):
            report["loss"] = loss(lm, store, run_id, args.per_category, shares)
    else:
        if args.shape:
            lm = random_model(args.shape, args.device)
        else:
            lm = models.load_model(None, device=args.device)
        report["model"] = lm.info.model_id
        if args.device == "cuda":
            report["device"] = torch.cuda.get_device_name()
        if not args.no_speed:
            report["speed"] = speed(lm, args, shares)
        if not args.no_loss and not args.shape:
            from core.store import Store

            store = Store(args.db) if args.db else Store()
            try:
                run_id = store.require_run(args.run).run_id
                report["loss"] = loss(lm, store, run_id, args.per_category, shares)
            finally:
                store.close()
    if "speed" in report:  # the headline figures at the top level too
        keys = ("dense_tokens_per_s", "settings", "matches_hf", *(("parts",) if args.parts else ()))
        report |= {k: report["speed"][k] for k in keys}
    line = json.dumps(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
