"""Co-activation counts for large layers on a torch device: unpacked bits times their transpose.

Exact: 0/1 int8 products summed in int32 (torch._int_mm), blocks of tokens bound the memory. The same
code runs on CPU torch, where the tests hold it to the numba kernel of core.kernels.coact. On a GPU
with fp8 tensor cores (compute capability 8.9 and up) the products are taken in fp8 instead, 0/1 in
e4m3 summed in fp32: exact while a block's sums stay below 2**24, and faster (issue #16); a probe on
the device checks that its fp8 products equal the int8 ones before they are used.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_BLOCK_BYTES = 1 << 29  # unpacked int8 bits per block: 512 MiB
SPLIT_ROWS = 4096  # from this many neurons on, the product is taken in 4 x 4 blocks, upper triangle only


def available() -> bool:
    return torch.cuda.is_available()


def unpack(words: torch.Tensor) -> torch.Tensor:
    """(rows, W) int64 words -> (rows, 64 W) int8 0/1; column j is bit j % 64 of word j // 64."""
    rows, n_words = words.shape
    as_bytes = words.contiguous().view(torch.uint8)  # little-endian: byte b of a word holds bits 8b..8b+7
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    return ((as_bytes.unsqueeze(-1) >> shifts) & 1).view(torch.int8).reshape(rows, 64 * n_words)


def pack(fired: torch.Tensor) -> torch.Tensor:
    """(rows, n) bool -> (rows, ceil(n / 64)) int64 words in the layout of core.kernels.coact.pack_bits."""
    rows, n = fired.shape
    padded = torch.zeros((rows, -(-n // 64) * 64), dtype=torch.uint8, device=fired.device)
    padded[:, :n] = fired
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=fired.device)
    as_bytes = (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)  # distinct bits: sum = OR
    return as_bytes.view(torch.int64)


def _words(bits) -> torch.Tensor:
    """uint64 numpy bits as an int64 tensor sharing their memory (numpy's uint64 has no torch twin)."""
    if isinstance(bits, torch.Tensor):
        return bits.view(torch.int64) if bits.dtype == torch.uint64 else bits
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint64).view(np.int64))


def unpack_by_neuron(words: torch.Tensor) -> torch.Tensor:
    """(rows, W) int64 token-major words -> (64 W, rows) int8 0/1: row j holds neuron j's bits."""
    rows = words.shape[0]
    as_bytes = words.contiguous().view(torch.uint8).t().contiguous()  # (8 W, rows): small, a cheap transpose
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device).view(1, 8, 1)
    return ((as_bytes.unsqueeze(1) >> shifts) & 1).view(torch.int8).reshape(-1, rows)


def _cuts(m: int) -> list[int]:
    """Row bounds of the parts whose upper-triangle products make up y @ y.T (multiples of 8, > 16 rows)."""
    parts = 4 if m >= max(SPLIT_ROWS, 128) else 1  # 10 of 16 blocks: 62% of the work of one product
    return [min(m, -(-m * i // parts // 8) * 8) for i in range(parts + 1)]


_ONE_FP8 = 0x38  # 1.0 as float8_e4m3fn bits
_FP8_MAX_K = 1 << 24  # fp32 sums of 0/1 are exact below this


def _gram(y: torch.Tensor, out: torch.Tensor, fp8: bool | None = None) -> None:
    """Upper block triangle of out += y @ y.T for row-major int8 0/1 y (m, k), k % 8 == 0, m % 8 == 0.

    Exact int32 sums of 0/1 products. Row-major times column-major is the layout cuBLAS's int8 kernels
    take (about 8x faster on an H200 than a transposed first operand). `fp8` None: fp8 where the
    device does it exactly (`fp8_exact`) and the shapes allow.
    """
    cuts = _cuts(len(y))
    if fp8 is None:
        k = y.shape[1]
        fp8 = k % 16 == 0 and k < _FP8_MAX_K and all(c % 16 == 0 for c in cuts) and fp8_exact(y.device)
    if fp8:
        y = (y * _ONE_FP8).view(torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32, device=y.device)
    for i in range(len(cuts) - 1):
        for j in range(i, len(cuts) - 1):
            rows, cols = slice(cuts[i], cuts[i + 1]), slice(cuts[j], cuts[j + 1])
            if fp8:
                part = torch._scaled_mm(y[rows], y[cols].t(), one, one, out_dtype=torch.float32)
                out[rows, cols] += part.to(torch.int32)
            else:
                out[rows, cols] += torch._int_mm(y[rows], y[cols].t())


@functools.cache
def fp8_exact(device: torch.device) -> bool:
    """Whether this device's fp8 products of 0/1 bits equal the int8 ones, checked once on the largest
    sums a block can hold (every bit set) and on random bits; False where fp8 is missing or fails."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    k = _BLOCK_BYTES // 4096 // 16 * 16  # as many tokens as a block of 4,096 neurons holds
    gen = torch.Generator(device=device).manual_seed(0)
    ones = torch.ones((32, k), dtype=torch.int8, device=device)
    bits = torch.randint(0, 2, (64, k), generator=gen, dtype=torch.int8, device=device)
    try:
        for y in (ones, bits):
            want = torch.zeros((len(y), len(y)), dtype=torch.int32, device=device)
            got = torch.zeros_like(want)
            _gram(y, want, fp8=False)
            _gram(y, got, fp8=True)
            if not torch.equal(want.triu(), got.triu()):
                return False
    except (RuntimeError, TypeError, AttributeError):  # no fp8 kernel for this build or device
        return False
    return True


def symmetric(out: torch.Tensor, n_neurons: int) -> np.ndarray:
    """The whole matrix from its upper triangle (the blocks below the diagonal were never computed)."""
    out = out[:n_neurons, :n_neurons]
    return (out.triu() + out.triu(1).t()).cpu().numpy()


def _padded_rows(n_neurons: int) -> int:
    return max(24, -(-n_neurons // 8) * 8)  # _int_mm needs m > 16 and n % 8 == 0


def coactivation_counts(
    bits, n_neurons: int, *, neuron_major: bool = False, device=None, block_bytes: int = _BLOCK_BYTES
) -> np.ndarray:
    """int32 (n_neurons, n_neurons), equal to core.kernels.coact.coactivation_counts on the same bits.

    `bits` are token-major (n_tokens, ceil(n_neurons / 64)) uint64, or with neuron_major=True the
    (n_neurons, n_token_words) output of core.kernels.coact.transpose_bits. Padding bits are ignored.
    """
    device = torch.device(device or ("cuda" if available() else "cpu"))
    words = _words(bits).to(device)
    if n_neurons == 0 or words.numel() == 0:
        return np.zeros((n_neurons, n_neurons), np.int32)
    m = _padded_rows(n_neurons)
    out = torch.zeros((m, m), dtype=torch.int32, device=device)
    if neuron_major:  # rows are neurons, bits are tokens (padding tokens are zero bits)
        if m > len(words):
            words = torch.cat([words, words.new_zeros((m - len(words), words.shape[1]))])
        step = max(1, block_bytes // m // 64)  # token words per block
        for lo in range(0, words.shape[1], step):
            _gram(unpack(words[:m, lo : lo + step]), out)
        return symmetric(out, n_neurons)
    add_counts(words, out, block_bytes)
    return symmetric(out, n_neurons)


def counts_buffer(n_neurons: int, device=None) -> torch.Tensor:
    """A zero int32 accumulator for `add_counts`: (m, m), m = n_neurons padded for torch._int_mm."""
    m = _padded_rows(n_neurons)
    return torch.zeros((m, m), dtype=torch.int32, device=device)


def add_counts(words: torch.Tensor, out: torch.Tensor, block_bytes: int = _BLOCK_BYTES) -> None:
    """out += the upper block triangle of the co-activation counts of token-major int64 words
    (n_tokens, W), on their device; `symmetric(out, n_neurons)` reads the whole matrix back."""
    n_tokens, n_words = words.shape
    m = out.shape[0]
    step = max(64, block_bytes // (64 * n_words) // 64 * 64)
    for lo in range(0, n_tokens, step):
        block = words[lo : lo + step]
        if len(block) % 16:  # _int_mm needs k % 8 == 0, fp8 k % 16 == 0: zero tokens add nothing
            block = torch.cat([block, block.new_zeros((16 - len(block) % 16, n_words))])
        # padding bits past the last neuron only reach rows and columns that symmetric drops
        _gram(unpack_by_neuron(block)[:m], out)  # m <= 64 W
