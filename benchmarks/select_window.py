"""How often the GPU selection kernel's window guess holds on a real model's activations.

core.kernels.select_gpu's paired kernel first searches a 2^near-key window for each token's cut-off (the k-th
largest 15-bit bf16 score), placed by the row's mean key plus the previous row's cut-off minus its mean
key; a miss costs the full 15-step search on top. This replays that guess, row for row as a program of
the kernel sees them (own tokens of consecutive prompts, `per_program` rows a program), on the default
model's activations (rounded to bf16 as a GPU capture holds them) and prints the share of hits.

It runs on the CPU: the kernel's guess is replayed in numpy, no GPU needed.
Run: python benchmarks/select_window.py [--prompts 48] [--near 5 6 7 8] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def output_keys(acts: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(n, d) int32 15-bit keys of |a| * ||W_down[:, i]|| as capture scores them in bf16."""
    import torch

    a = torch.from_numpy(acts).to(torch.bfloat16).abs()
    score = a * torch.from_numpy(norm).to(torch.bfloat16)
    return score.view(torch.int16).numpy().astype(np.int32) & 0x7FFF


def window_hits(cut: np.ndarray, mean: np.ndarray, near: int, per_program: int = 64) -> np.ndarray:
    """(n,) bool: whether each row's cut-off lay in the kernel's window (a program's first row: offset 0).

    cut: each row's k-th largest key; mean: each row's mean key (integer division, as the kernel).
    """
    width = 1 << near
    hits = np.zeros(len(cut), dtype=bool)
    offset = 0
    for row in range(len(cut)):
        if row % per_program == 0:
            offset = 0
        lo = min(max(int(mean[row]) + offset - width // 2, 0), 0x8000 - width)
        hits[row] = lo <= cut[row] < lo + width
        offset = int(cut[row]) - int(mean[row])
    return hits


def main() -> None:
    import torch

    from core import models, prompts
    from core.capture import run as capture

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=48, help="the first N default prompts")
    p.add_argument("--near", type=int, nargs="+", default=[5, 6, 7, 8])
    p.add_argument("--per-program", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="a tiny random model and 4 prompts")
    args = p.parse_args()
    if args.smoke:
        import _tiny  # beside this file

        lm, args.prompts = _tiny.model(), 4
    else:
        lm = models.load_model()
    config = capture.CaptureConfig()
    k = math.ceil(config.fire_fraction * lm.info.d_ff)
    seen: dict[int, list[np.ndarray]] = {layer: [] for layer in range(lm.info.n_layers)}
    current: dict[int, torch.Tensor] = {}
    hooks = [
        models.down_proj(lm.model, layer).register_forward_pre_hook(
            lambda _m, inp, layer=layer: current.__setitem__(layer, inp[0][0].float())
        )
        for layer in range(lm.info.n_layers)
    ]
    try:
        with torch.inference_mode():
            for prompt in prompts.default_prompt_set().head(args.prompts).prompts:
                e = prompts.encode(lm.tokenizer, prompt.text, config.max_tokens, config.chat_template)
                lm.model.base_model(input_ids=torch.tensor([e.ids]))
                for layer, a in current.items():
                    seen[layer].append(a[e.start : e.end].numpy())
    finally:
        for h in hooks:
            h.remove()
    per_near = {near: [] for near in args.near}
    for layer, rows in seen.items():
        keys = output_keys(np.concatenate(rows), models.down_column_norms(lm.model, layer).numpy())
        cut, mean = -np.sort(-keys, axis=1)[:, k - 1], keys.sum(axis=1) // keys.shape[1]
        for near in args.near:
            per_near[near].append(window_hits(cut, mean, near, args.per_program))
    n_tokens = sum(len(r) for r in seen[0])
    result = {
        "model": lm.info.model_id, "prompts": args.prompts, "tokens": n_tokens, "layers": lm.info.n_layers,
        "k": k, "per_program": args.per_program,
        "hit_rate": {str(near): float(np.concatenate(h).mean()) for near, h in per_near.items()},
        "worst_layer_hit_rate": {str(near): float(min(x.mean() for x in h)) for near, h in per_near.items()},
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
