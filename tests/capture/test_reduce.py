"""The running merge of top examples: any order of chunks gives the single stable merge of all of them."""

import itertools

import numpy as np

from core.capture.reduce import merge_top

CHUNK_PROMPTS, TOP_K, D_FF = 5, 4, 32


def chunk_list(rng, chunk: int):
    """One chunk's top examples as ChunkReducer gives them: (k, d_ff) value, prompt, position, each
    column sorted by value descending, tied values in an arbitrary order (torch.topk's)."""
    prompts = chunk * CHUNK_PROMPTS + np.arange(CHUNK_PROMPTS)
    vals = rng.integers(0, 4, (CHUNK_PROMPTS, D_FF)).astype(np.float32)  # few values: many ties
    shuffled = np.stack([rng.permutation(CHUNK_PROMPTS) for _ in range(D_FF)], axis=1)
    vals = np.take_along_axis(vals, shuffled, 0)
    order = np.argsort(-vals, axis=0, kind="stable")[:TOP_K]
    prompt = np.take_along_axis(prompts[shuffled], order, 0).astype(np.int32)
    pos = rng.integers(0, 9, prompt.shape).astype(np.int32)
    return np.take_along_axis(vals, order, 0), prompt, pos


def merged_at_the_end(lists):
    """What finalising did before the running merge: a stable sort of every chunk's list in chunk order."""
    vals, prompt, pos = (np.concatenate([piece[i] for piece in lists]) for i in range(3))
    order = np.argsort(-vals, axis=0, kind="stable")[:TOP_K]
    return tuple(np.take_along_axis(a, order, 0) for a in (vals, prompt, pos))


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_running_merge_in_any_chunk_order_equals_the_merge_at_the_end():
    rng = np.random.default_rng(0)
    lists = [chunk_list(rng, c) for c in range(4)]
    expected = merged_at_the_end(lists)
    assert (np.diff(expected[0], axis=0) == 0).any()  # ties across chunks are there to be ordered
    for order in itertools.permutations(range(4)):
        state = []
        for c in order:  # one chunk at a time, as a resumed or a sharded capture commits them
            state = [merge_top([*state, lists[c]], TOP_K, CHUNK_PROMPTS)]
        assert_same(state[0], expected)
    halves = [
        merge_top([lists[0], lists[2]], TOP_K, CHUNK_PROMPTS),
        merge_top(lists[3:0:-2], TOP_K, CHUNK_PROMPTS),
    ]
    assert_same(merge_top(halves[::-1], TOP_K, CHUNK_PROMPTS), expected)  # shards' merges, merged


def test_the_merge_keeps_layers_apart_and_fewer_than_k_when_there_are_fewer():
    rng = np.random.default_rng(1)
    layers = [[chunk_list(rng, c) for c in range(2)] for _ in range(2)]
    stacked = [tuple(np.stack([layers[0][c][i], layers[1][c][i]]) for i in range(3)) for c in range(2)]
    merged = merge_top(stacked, TOP_K, CHUNK_PROMPTS)  # (2, k, d_ff) each
    for layer in range(2):
        assert_same([m[layer] for m in merged], merged_at_the_end(layers[layer]))
    one = merge_top(layers[0][:1], 2 * TOP_K, CHUNK_PROMPTS)
    assert one[0].shape == (TOP_K, D_FF)
    assert_same(one, layers[0][0])  # a chunk's own list alone is already in order


def test_the_in_order_merge_on_a_device_equals_merge_top():
    """The running state merged with torch's stable sort (a GPU's path) equals merge_top when chunks
    come in order, as they do in one capture, ties included."""
    import torch

    from core.capture.reduce import merge_top_in_order

    rng = np.random.default_rng(1)
    lists = [chunk_list(rng, c) for c in range(5)]
    state, tensors = [], None
    for piece in lists:
        state = [merge_top([*state, piece], TOP_K, CHUNK_PROMPTS)]
        tensors = merge_top_in_order(tensors, tuple(torch.from_numpy(a) for a in piece), TOP_K)
        assert_same(tuple(t.numpy() for t in tensors), state[0])
    assert (np.diff(state[0][0], axis=0) == 0).any()  # ties were there to be ordered
