"""Batch-1 greedy decoding with a static KV cache for timing FFN variants: one step of fixed shapes,
captured once as a CUDA graph and replayed, so that only the FFN differs between settings and launch
overhead does not hide it (eager decoding of a small batch is bound by kernel launches).
"""

from __future__ import annotations

import time

import torch


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, as transformers computes it (float32 inside)."""
    x = h.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _attention_block(h, ln1, wqkv, wo, ln2, k_cache, v_cache, cos, sin, positions, pos, eps, heads, kv_heads):
    """One layer up to the FFN for one token: h (1, d) -> (h + attention, the FFN's input (1, d)).
    Writes this position's key and value into the caches; attends over every cached position up to pos."""
    qkv = _rms(h, ln1, eps) @ wqkv.T  # (1, (heads + 2 kv_heads) head_dim)
    out = _attend(qkv, k_cache, v_cache, cos, sin, positions, pos, heads, kv_heads)
    return _residual(h, out @ wo.T, ln2, eps)


def _attend(qkv, k_cache, v_cache, cos, sin, positions, pos, heads, kv_heads):
    """Attention of one token from its q, k, v (1, (heads + 2 kv_heads) head_dim), any float dtype:
    RoPE, this position into the caches, softmax over the cached positions up to pos -> (1, heads hd)."""
    head_dim = k_cache.shape[-1]
    q, k, v = qkv.to(k_cache.dtype).view(-1, head_dim).split((heads, kv_heads, kv_heads))
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)
    half = head_dim // 2
    q = q * c + torch.cat((-q[:, half:], q[:, :half]), dim=-1) * s
    k = k * c + torch.cat((-k[:, half:], k[:, :half]), dim=-1) * s
    k_cache.index_copy_(1, pos, k[:, None])
    v_cache.index_copy_(1, pos, v[:, None])
    q = q.view(kv_heads, heads // kv_heads, head_dim)
    scores = (q @ k_cache.transpose(1, 2)).float() / head_dim**0.5  # (kv_heads, group, max_len)
    scores = scores.masked_fill(positions > pos, float("-inf"))
    return (scores.softmax(-1).to(k_cache.dtype) @ v_cache).reshape(1, -1)


def _residual(h, attention, ln2, eps):
    """(h + attention, the FFN's input): attention (1, d) in any float dtype."""
    h = h + attention.to(h.dtype)
    return h, _rms(h, ln2, eps)


class Projections:
    """The attention projections of every layer, computed densely (cuBLAS): `qkv(layer, x)` from the
    attention's input x (1, d) -> (1, n_qkv), `o(layer, y)` from the attention's output. A setting that
    passes its own (sparse ones) to Decoder.step changes only these products."""

    def __init__(self, dec: Decoder):
        self.weights = dec.weights

    def qkv(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weights[layer][1].T

    def o(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        return y @ self.weights[layer][2].T


class SparseProjections(Projections):
    """Input-sparse attention projections (as in TEAL): q/k/v skip the attention input's |x_k| <
    t_qkv[layer], o the attention output's |y_k| < t_o[layer]; through core.kernels.sparse_gpu, which
    never reads the skipped weight rows (input-major copies of the weights, made once per decoder)."""

    def __init__(self, dec: Decoder, t_qkv, t_o):
        from core.kernels import sparse_gpu

        super().__init__(dec)
        self.kernels = sparse_gpu
        if dec.input_major is None:
            dec.input_major = [(sparse_gpu.input_major(wqkv), sparse_gpu.input_major(wo))
                               for _, wqkv, wo, _ in dec.weights]  # fmt: skip
        self.packed = dec.input_major
        self.t_qkv, self.t_o = [float(t) for t in t_qkv], [float(t) for t in t_o]

    def qkv(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        return k.project(x, self.packed[layer][0], self.t_qkv[layer], k.TILES.qkv).view(1, -1)

    def o(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        return k.project(y, self.packed[layer][1], self.t_o[layer], k.TILES.o).view(1, -1)


class Decoder:
    """Batch-1 greedy decoding of a Llama-shaped transformers model with a static KV cache, one token a
    step; `step(ffn)` reads `token` and `pos` and writes the next token, so it can be graph-captured.
    `ffn(layer, x)` computes layer's FFN on x (1, 1, d_model): the one thing a setting changes. With
    `compile`, the attention part (the same for every setting) runs through torch.compile."""

    def __init__(self, model, max_len: int, compile: bool = False):
        cfg, inner = model.config, model.model
        self.model, self.layers, self.max_len = model, list(inner.layers), max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        p = next(model.parameters())
        self.device, self.dtype, self.eps = p.device, p.dtype, cfg.rms_norm_eps
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=p.device).float() / head_dim)
        angles = torch.arange(max_len, device=p.device).float()[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # (max_len, head_dim)
        self.cos, self.sin = angles.cos().to(p.dtype), angles.sin().to(p.dtype)
        # one allocation a layer, not views of one: a compiled block then serves every layer unchanged
        shape = (self.kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.positions = torch.arange(max_len, device=p.device)
        self.token = torch.zeros(1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=p.device)
        self.weights = [
            (
                b.input_layernorm.weight,
                torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]),
                b.self_attn.o_proj.weight,
                b.post_attention_layernorm.weight,
            )
            for b in self.layers
        ]
        self.input_major = None  # the attention weights input-major, for SparseProjections
        parts = (_attention_block, _rms, _attend, _residual)
        if compile:
            parts = tuple(torch.compile(f, dynamic=False) for f in parts)
        self.block, self.norm, self.attend, self.residual = parts

    def reset(self, first_token: int) -> None:
        self.pos.zero_()
        self.token.fill_(first_token)

    def step(self, ffn, projections: Projections | None = None) -> None:
        """One token. Without `projections` the attention part is one (compiled) block with cuBLAS
        projections; with them, the projections are theirs, between compiled parts before and after."""
        h = self.model.model.embed_tokens(self.token).view(1, -1)
        for i, (ln1, wqkv, wo, ln2) in enumerate(self.weights):
            cache = (self.k[i], self.v[i], self.cos, self.sin, self.positions, self.pos)
            if projections is None:
                h, x = self.block(h, ln1, wqkv, wo, ln2, *cache, self.eps, self.heads, self.kv_heads)
            else:
                qkv = projections.qkv(i, self.norm(h, ln1, self.eps))
                out = projections.o(i, self.attend(qkv, *cache, self.heads, self.kv_heads))
                h, x = self.residual(h, out, ln2, self.eps)
            h = h + ffn(i, x.view(1, 1, -1)).view(1, -1)
        logits = self.model.lm_head(_rms(h, self.model.model.norm.weight, self.eps)).view(-1)
        self.token.copy_(logits.argmax().view(1))
        self.pos.add_(1)


class Runner:
    """One setting's decode: a CUDA graph of one step (on CUDA) or the eager step."""

    def __init__(self, dec: Decoder, ffn, graph: bool, projections: Projections | None = None):
        self.dec, self.ffn, self.projections, self.graph = dec, ffn, projections, None
        if graph:
            dec.reset(0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    dec.step(ffn, projections)
            torch.cuda.current_stream().wait_stream(side)
            dec.reset(0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                dec.step(ffn, projections)

    def one(self) -> None:
        self.graph.replay() if self.graph is not None else self.dec.step(self.ffn, self.projections)

    def generate(self, prompt: list[int], n: int, timed: bool = False):
        """Greedy tokens after prompt, and seconds for the n generated ones (prompt fed a token a step)."""
        dec = self.dec
        dec.reset(prompt[0])
        for t in prompt[1:]:
            self.one()
            dec.token.fill_(t)
        sync(dec.device)
        start, out = time.perf_counter(), []
        for _ in range(n):
            self.one()
            if not timed:
                out.append(dec.token.clone())
        sync(dec.device)
        return [int(t) for t in out], time.perf_counter() - start


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(runners: dict[str, Runner], prompt: list[int], n: int, reps: int) -> dict[str, list[float]]:
    """Seconds for n greedy tokens after prompt, per runner and repetition; the runners take turns and
    the order rotates each repetition, so a slow spell of the machine falls on all of them."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            seconds[name].append(runners[name].generate(prompt, n, timed=True)[1])
    return seconds
