"""The batch-1 decode harness (core.routing.decode): its greedy tokens equal transformers' own, with the
attention projections fused into one block or split out (the path sparse projections take), and with
masked projection inputs equal to the model run under core.routing.thresholds.attention_inputs."""

import torch

from core.live import sparse
from core.routing import decode, thresholds

PROMPT = [1, 502, 3312, 7, 981, 44]


@torch.inference_mode()
def hf_tokens(model, n: int) -> list[int]:
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0, len(PROMPT) :].tolist()


class Masked(decode.Projections):
    def __init__(self, dec, t_qkv, t_o):
        super().__init__(dec)
        self.t_qkv, self.t_o = t_qkv, t_o

    def qkv(self, layer, x):
        return super().qkv(layer, x.masked_fill(x.abs() < self.t_qkv[layer], 0.0))

    def o(self, layer, y):
        return super().o(layer, y.masked_fill(y.abs() < self.t_o[layer], 0.0))


def test_split_and_masked_projections_decode_as_transformers(tiny_lm):
    model, n = tiny_lm.model, 8
    dec = decode.Decoder(model, len(PROMPT) + n + 1)
    blocks = [b.mlp for b in model.model.layers]
    dense = lambda i, x: blocks[i](x)  # noqa: E731
    with torch.inference_mode():
        fused, _ = decode.Runner(dec, dense, graph=False).generate(PROMPT, n)
        split, _ = decode.Runner(dec, dense, graph=False, projections=decode.Projections(dec)).generate(
            PROMPT, n
        )
    assert fused == split == hf_tokens(model, n)

    seen = thresholds.calibrate_attention(tiny_lm, [PROMPT])
    assert len(seen) == len(blocks) and seen[0][0][0].shape == (len(PROMPT), model.config.hidden_size)
    t_qkv, t_o = thresholds.attention_thresholds(seen, 0.5)
    skipped = float((torch.cat(seen[1][0]) < t_qkv[1]).float().mean())
    assert abs(skipped - 0.5) < 0.05
    with torch.inference_mode():
        masked, _ = decode.Runner(dec, dense, graph=False, projections=Masked(dec, t_qkv, t_o)).generate(
            PROMPT, n
        )
    with thresholds.attention_inputs(model, thresholds.attention_functions(t_qkv, t_o)):
        assert masked == hf_tokens(model, n)
    assert masked != fused  # half the attention inputs skipped changes a random model's greedy tokens
    assert not any(m._forward_pre_hooks for m in model.modules())  # the context's hooks are gone


def test_attention_masks_compose_with_the_sparse_ffn_and_change_the_logits(tiny_lm):
    model = tiny_lm.model
    ids = torch.tensor([PROMPT])
    seen = thresholds.calibrate_attention(tiny_lm, [PROMPT])
    functions = thresholds.attention_functions(*thresholds.attention_thresholds(seen, 0.4))
    with torch.inference_mode():
        dense = model(ids).logits
        with thresholds.attention_inputs(model, functions):
            attn = model(ids).logits
            with sparse.sparse(model, thresholds.layer_functions([0.1, 0.1])):
                both = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(dense, attn) and not torch.allclose(attn, both)
    assert torch.equal(dense, after)
    zero = thresholds.attention_functions(*thresholds.attention_thresholds(seen, 0.0))
    with torch.inference_mode(), thresholds.attention_inputs(model, zero):
        assert torch.equal(model(ids).logits, dense)  # zero thresholds skip nothing
