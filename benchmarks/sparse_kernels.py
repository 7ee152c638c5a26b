"""The input-sparse matrix-vector kernels (core.kernels.sparse_gpu) against dense cuBLAS, per projection
of one decoded token of Llama-3-8B's shape: gate+up (4096 -> 2 x 14336), down (14336 -> 4096), q+k+v
(4096 -> 4096 + 2 x 1024) and o (4096 -> 4096), with 0/25/40/50% of the inputs skipped.

Each product is timed as a CUDA graph of several copies of its weights one after another (so that the
weights are never in L2, as in decoding, where 32 layers pass before a layer's weights come back):
median microseconds per product over the replays. Every launch shape of both kernels ("tile": each
program a tile of rows and loads only the kept ones; "listed": the kept inputs listed once, the list
split among programs) is timed at 40% and 50%; the best of each is then timed at every share, and the
best overall is checked against the masked dense product. cuBLAS is timed on the same layouts as
transformers' (out x in), each projection separately as the model runs them, and fused (one weight).
Last line: one JSON object ("chosen": the launch per product, as core.kernels.sparse_gpu.Launch).
Run: python benchmarks/sparse_kernels.py [--smoke] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics

import torch
import torch.nn.functional as F

SHARES = (0.0, 0.25, 0.4, 0.5)
PRODUCTS = {  # name -> (inputs, outputs of each projection the model runs separately)
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
}
L2_BYTES = 60e6


def graph_us(fn, reps: int = 30) -> float:
    """Median microseconds of one replay of a CUDA graph of fn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles, picks cuBLAS kernels
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
    ]
    graph.replay()
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events)


def candidates(quick: bool):
    from core.kernels.sparse_gpu import Launch

    ks, ns = ((16, 32, 64), (128, 256, 512)) if quick else ((8, 16, 32, 64, 128), (64, 128, 256, 512, 1024))
    for k, n, warps in itertools.product(ks, ns, (2, 4, 8)):
        if 4 <= k * n // (32 * warps) <= 128:  # the weight tile a thread holds
            yield Launch(False, k, n, warps)
    for k, n, warps, chunk in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (128, 256, 512)):
        per_thread = k * n // (32 * warps)
        for ahead in (True, False):
            if 4 <= per_thread <= (32 if ahead else 64):  # the float32 accumulator (and 2 tiles ahead)
                yield Launch(True, k, n, warps, chunk, ahead)


def product(name: str, quick: bool, device) -> dict:
    from core.kernels import sparse_gpu

    k, outs = PRODUCTS[name]
    n = sum(outs)
    bytes_ = 2 * k * n
    copies = max(2, math.ceil(4 * L2_BYTES / bytes_))
    g = torch.Generator(device=device).manual_seed(0)
    weights = [
        torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) / k**0.5 for _ in range(copies)
    ]
    w_t = [w.T.contiguous() for w in weights]
    x = torch.randn(k, device=device, dtype=torch.bfloat16, generator=g)
    cut = {s: float(torch.quantile(x.float().abs(), s)) if s else 0.0 for s in SHARES}
    split = [list(w.split(list(outs))) for w in weights]
    xb = x.view(1, -1)
    report = {"k": k, "n": n, "bytes": bytes_, "copies": copies}
    report["cublas_separate_us"] = graph_us(lambda: [F.linear(xb, p) for ps in split for p in ps]) / copies
    report["cublas_fused_us"] = graph_us(lambda: [F.linear(xb, w) for w in weights]) / copies
    zero = torch.zeros(0, device=device)
    report["list_us"] = (
        graph_us(lambda: [sparse_gpu._list(x, cut[0.5], zero, 256) for _ in range(copies)]) / copies
    )

    def us(launch, share):
        return graph_us(lambda: [sparse_gpu.project(x, w, cut[share], launch) for w in w_t]) / copies

    rows = [{"launch": launch, "40": us(launch, 0.4), "50": us(launch, 0.5)} for launch in candidates(quick)]
    best = {}
    for listed in (False, True):
        mine = sorted((r for r in rows if r["launch"].listed == listed), key=lambda r: r["40"] + r["50"])
        best["listed" if listed else "tile"] = [
            {"launch": r["launch"].__dict__, **{f"{s:.0%}": us(r["launch"], s) for s in SHARES}}
            for r in mine[:2]
        ]
    top = min((b for v in best.values() for b in v), key=lambda b: b["40%"] + b["50%"])
    launch = sparse_gpu.Launch(**top["launch"])
    errors = {}
    for share in SHARES:
        ref = sparse_gpu.proj_reference(x, w_t[0], cut[share])
        got = sparse_gpu.project(x, w_t[0], cut[share], launch).double()
        errors[f"{share:.0%}"] = float((got - ref).norm() / ref.norm())
    dense = report["cublas_separate_us"]
    report |= {"tried": len(rows), "best": best, "chosen": top["launch"], "relative_error": errors,
               "chosen_us": {s: top[s] for s in top if s.endswith("%")},
               "time_vs_cublas": {s: round(top[s] / dense, 3) for s in top if s.endswith("%")},
               "time_vs_own_dense": {s: round(top[s] / top["0%"], 3) for s in top if s.endswith("%")},
               "cublas_tb_per_s": bytes_ / dense / 1e6}  # fmt: skip
    print(name, {key: report[key] for key in ("cublas_separate_us", "chosen", "chosen_us", "time_vs_cublas")},
          flush=True)  # fmt: skip
    return report


def ffn(products: dict, device) -> dict:
    """The whole FFN of one token: cuBLAS (gate, up, SiLU*mul, down) against ffn_one with gate+up's
    chosen launch and down's best tile or listed launch, t_x and tau cutting each share of inputs and
    neurons. Chooses down's launch for the FFN (where listing the neurons rides on the activation)."""
    from core.kernels import sparse_gpu

    d, f = 4096, 14336
    g = torch.Generator(device=device).manual_seed(1)
    copies = 2
    layers = [[torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g) / s[1] ** 0.5
               for s in ((f, d), (f, d), (d, f))] for _ in range(copies)]  # fmt: skip
    packed = [sparse_gpu.Packed.of(*w) for w in layers]
    x = torch.randn(1, d, device=device, dtype=torch.bfloat16, generator=g)
    a = F.silu(F.linear(x, layers[0][0]).float()) * F.linear(x, layers[0][1]).float()
    rel = (a.abs() / a.abs().max()).flatten()
    out = {"cublas_us": graph_us(lambda: [F.linear(F.silu(F.linear(x, gw)) * F.linear(x, uw), dw)
                                          for gw, uw, dw in layers]) / copies}  # fmt: skip
    gate_up = sparse_gpu.Launch(**products["gate_up"]["chosen"])
    for kind, best in products["down"]["best"].items():
        tiles = sparse_gpu.Tiles(gate_up=gate_up, down=sparse_gpu.Launch(**best[0]["launch"]))
        row = out[kind] = {"down": best[0]["launch"]}
        for s in SHARES:
            t_x = float(torch.quantile(x.float().abs(), s)) if s else 0.0
            tau = float(torch.quantile(rel, s)) if s else 0.0
            row[f"{s:.0%}"] = (
                graph_us(
                    lambda t_x=t_x, tau=tau, tiles=tiles: [
                        sparse_gpu.ffn_one(x, p, t_x, tau, tiles) for p in packed
                    ]
                )
                / copies
            )
            ref = sparse_gpu.reference(x, packed[0], t_x, tau)
            got = sparse_gpu.ffn_one(x, packed[0], t_x, tau, tiles).double()
            row[f"error {s:.0%}"] = float((got - ref).norm() / ref.norm())
    best = min(("tile", "listed"), key=lambda k: out[k]["40%"] + out[k]["50%"])
    out["chosen_down"] = out[best]["down"]
    out["time_vs_cublas"] = {f"{s:.0%}": round(out[best][f"{s:.0%}"] / out["cublas_us"], 3) for s in SHARES}
    print("ffn", out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="without CUDA: say so and stop")
    p.add_argument("--quick", action="store_true", help="fewer launch shapes")
    p.add_argument("--products", default=",".join(PRODUCTS))
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    report: dict = {"products": {}, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        import triton

        torch.set_grad_enabled(False)
        report |= {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
        for name in args.products.split(","):
            report["products"][name] = product(name, args.quick, torch.device("cuda"))
        chosen = {name: r["chosen"] for name, r in report["products"].items()}
        if {"gate_up", "down"} <= set(chosen):
            report["ffn"] = ffn(report["products"], torch.device("cuda"))
            chosen["down"] = report["ffn"]["chosen_down"]
        report["chosen"] = chosen
    line = json.dumps(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
