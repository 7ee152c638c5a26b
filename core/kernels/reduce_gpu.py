"""Fused Triton kernels for capture's per-prompt reductions on CUDA: mean |a|, sum a and the strongest
own token of each prompt and neuron, reading a layer's activation once. The per-token selection is
core.kernels.select_gpu.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prompt_kernel(
    a_ptr, first_ptr, length_ptr, mean_ptr, sum_ptr, best_ptr, pos_ptr, d, stride,
    STEPS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < d
    first, length = tl.load(first_ptr + b), tl.load(length_ptr + b)
    total_abs = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.full([BLOCK], -1.0, dtype=tl.float32)
    pos = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(STEPS):  # masked past this prompt's own length
        lo = step * ROWS
        rows = lo + tl.arange(0, ROWS)
        own = rows < length
        mask = own[:, None] & valid[None, :]
        x = tl.load(
            a_ptr + (first + rows).to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0
        )
        x = x.to(tl.float32)
        total += tl.sum(x, axis=0)
        total_abs += tl.sum(tl.abs(x), axis=0)
        tile_best, tile_pos = tl.max(tl.where(mask, tl.abs(x), -1.0), axis=0, return_indices=True)
        better = tile_best > best  # strict: the earliest token keeps a tie
        best = tl.where(better, tile_best, best)
        pos = tl.where(better, lo + tile_pos, pos)
    out = b * d + cols
    tl.store(mean_ptr + out, total_abs / length.to(tl.float32), mask=valid)
    tl.store(sum_ptr + out, total, mask=valid)
    tl.store(best_ptr + out, best, mask=valid)
    tl.store(pos_ptr + out, pos, mask=valid)


# neurons a program, warps, rows a step: the fastest tile of gpu_capture.py --prompt-kernel on an H200 (an
# 8B shape's layer-batch of 16 x 512 tokens: 0.098 ms against 0.121 for 64 rows x 2048 neurons, 8 warps)
PROMPT = {"block": 1024, "warps": 4, "rows": 16}


def prompt_reduce(a, first, lengths, longest: int, rows=None, block=None, warps=None):
    """(B, d) float32 mean |a|, sum a, best |a| and int32 its position, over each prompt's own rows.

    Tiles of PROMPT["rows"] rows x PROMPT["block"] neurons; other tiles sum in another order, so their
    results are not bit for bit the same (within float32 rounding).
    """
    block, warps, rows = block or PROMPT["block"], warps or PROMPT["warps"], rows or PROMPT["rows"]
    n_prompts, d = len(first), a.shape[1]
    mean, total, best = (torch.empty((n_prompts, d), device=a.device) for _ in range(3))
    pos = torch.empty((n_prompts, d), dtype=torch.int32, device=a.device)
    grid = (n_prompts, triton.cdiv(d, block))
    steps = triton.next_power_of_2(triton.cdiv(longest, rows))  # few compiled loop lengths
    _prompt_kernel[grid](
        a, first, lengths, mean, total, best, pos, d, a.stride(0),
        STEPS=steps, ROWS=rows, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return mean, total, best, pos
