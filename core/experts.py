"""Mixture-of-experts layers as FFN neurons. transformers 5 keeps a layer's experts fused in one
`mlp.experts` module (stacked weights, no per-expert down projection to hook); while a hook needs them,
its forward is replaced by one that passes two virtual sites, which the Dispatchers hook like any other.

A MoE layer's neurons are its routed experts' side by side: neuron e * d_expert + i is neuron i of
expert e (global id layer * d_ff + e * d_expert + i, d_ff = n_experts * d_expert). At a token not
routed to expert e its neurons' activations are 0 (so a run's means count those tokens as 0), and a
change to them is not computed: a 'mean' brick adds its mean only where the expert runs. Masking all
of an expert's neurons equals removing it from the router's choice without renormalising. Shared
experts (qwen2_moe) run unchanged. Every layer must be a MoE layer of one layout (no dense layers
between, as in DeepSeek-V3's first three), since a run has one width per layer.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from core.errors import BricklabError
from core.live.hooks import SharedInstall

# config.model_type of the decoder-only MoE families whose experts module this file runs
MOE_TYPES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "phimoe",
    "granitemoe",
    "flex_olmo",
    "minimax",
    "hunyuan_v1_moe",
    "ernie4_5_moe",
    "cohere2_moe",
    "solar_open",
)
MOE_BLOCK = {"granitemoe": "block_sparse_moe"}  # where the MoE block sits in a decoder layer (else mlp)


@dataclass(frozen=True)
class Layout:
    n_experts: int
    d_expert: int  # neurons per expert
    top_k: int  # experts routed per token

    def expert_of(self, index):
        """The expert a layer-local neuron index belongs to."""
        return index // self.d_expert


def block_path(model_type: str) -> str:
    return f"{MOE_BLOCK.get(model_type, 'mlp')}.experts"


def experts_modules(model) -> list:
    """Each decoder layer's fused experts module; a clear refusal where the model's layers are not all
    MoE layers of one supported layout."""
    from core import models

    path = block_path(model.config.model_type)
    found = [_get(block, path) for block in models.blocks(model)]
    if any(module is None for module in found):
        raise BricklabError(
            f"This {model.config.model_type} model mixes dense and mixture-of-experts layers.",
            "bricklab needs every layer to have the same FFN neurons; use a model whose layers are all "
            "MoE layers (e.g. decoder_sparse_step 1 and no mlp_only_layers).",
        )
    for module in found:
        _check_layout(module)
    return found


def layout(model) -> Layout:
    first = experts_modules(model)[0]
    top_k = getattr(model.config, "num_experts_per_tok", None) or getattr(model.config, "top_k", 1)
    return Layout(int(first.down_proj.shape[0]), int(first.down_proj.shape[2]), int(top_k))


def is_moe(model) -> bool:
    return model.config.model_type in MOE_TYPES


def _get(block, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _check_layout(module) -> None:
    unsupported = [
        name
        for name, bad in (
            ("transposed weights", getattr(module, "is_transposed", False)),
            ("biases", getattr(module, "has_bias", False)),
            ("interleaved gate/up weights", not getattr(module, "is_concatenated", True)),
            ("no gate", not getattr(module, "has_gate", True)),
            ("a norm after each expert", getattr(module, "has_post_expert_norm", False)),
        )
        if bad
    ]
    if unsupported or getattr(module, "gate_up_proj", None) is None or module.down_proj.dim() != 3:
        raise BricklabError(
            f"The experts of {type(module).__name__} have a layout bricklab does not run "
            f"({', '.join(unsupported) or 'no fused gate_up_proj'}).",
            f"Supported mixture-of-experts families: {', '.join(MOE_TYPES)}.",
        )


# --- the virtual sites --------------------------------------------------------------------------


class ExpertDown(torch.nn.Module):
    """The down projections of a layer's experts as one site: its first input is the layer's activation
    (N, n_experts * d_expert), 0 where a token is not routed to an expert; `weight` is W_down as
    (d_model, d_ff), one column per neuron, like a dense layer's."""

    bias = None

    def __init__(self, experts):
        super().__init__()
        self._experts = weakref.ref(experts)

    @property
    def weight(self) -> torch.Tensor:
        down = self._experts().down_proj  # (E, d_model, d_expert)
        return down.permute(1, 0, 2).reshape(down.shape[1], -1)

    def expose(self):
        return expose(self._experts())

    def forward(self, a, top_k_index, top_k_weights):  # (N, d_ff), (N, k), (N, k) -> (N, d_model)
        experts = self._experts()
        n_experts, d_model, d_expert = experts.down_proj.shape
        a = a.view(a.shape[0], n_experts, d_expert)
        out = a.new_zeros((a.shape[0], d_model))
        for expert, pos, token in _routed(top_k_index, n_experts):
            h = torch.nn.functional.linear(a[token, expert], experts.down_proj[expert])
            out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
        return out


class ExpertRoutes(torch.nn.Module):
    """The router's choice of a layer as one site: its first input is the routing weights as a dense
    (N, n_experts) matrix, 0 where an expert is not chosen; it returns them unchanged."""

    def __init__(self, experts):
        super().__init__()
        self._experts = weakref.ref(experts)

    def expose(self):
        return expose(self._experts())

    def forward(self, weights):
        return weights


_sites: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # experts module -> (down, routes)


def sites(experts) -> tuple[ExpertDown, ExpertRoutes]:
    """The two virtual sites of an experts module: the same objects every time (Dispatchers key by id)."""
    if experts not in _sites:
        _sites[experts] = (ExpertDown(experts), ExpertRoutes(experts))
    return _sites[experts]


def down_site(experts) -> ExpertDown:
    return sites(experts)[0]


def routes_site(experts) -> ExpertRoutes:
    return sites(experts)[1]


def _routed(top_k_index: torch.Tensor, n_experts: int):
    """(expert, slot, token) index tensors per routed expert, in the order transformers' eager loop uses."""
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        if expert < n_experts:
            pos, token = torch.where(mask[expert])
            yield expert, pos, token


def _exposing_forward(experts):
    down, routes = sites(experts)

    def forward(hidden_states, top_k_index, top_k_weights):
        n_experts = experts.down_proj.shape[0]
        dense = top_k_weights.new_zeros((hidden_states.shape[0], n_experts))
        dense = routes(dense.scatter(1, top_k_index, top_k_weights))  # (N, n_experts)
        top_k_weights = dense.gather(1, top_k_index)
        d_expert = experts.down_proj.shape[2]
        a = hidden_states.new_zeros((hidden_states.shape[0], n_experts, d_expert))
        for expert, _, token in _routed(top_k_index, n_experts):
            gate_up = torch.nn.functional.linear(hidden_states[token], experts.gate_up_proj[expert])
            a[token, expert] = experts._apply_gate(gate_up).to(a.dtype)
        return down(a.view(a.shape[0], -1), top_k_index, top_k_weights)

    return forward


def _install_forward(experts):
    own = vars(experts).get("forward")  # an instance forward set by someone else
    experts.forward = _exposing_forward(experts)
    experts.forward.bricklab_own = own

    def remove() -> None:
        del experts.forward
        if own is not None:
            experts.forward = own

    return remove


_forwards = SharedInstall(_install_forward)


def expose(experts):
    """Run `experts` through its virtual sites until the returned function is called (reference counted:
    the first caller replaces the forward, the last one restores it)."""
    stack = ExitStack()
    stack.enter_context(_forwards.held(experts))
    return stack.close


def exposed(experts) -> bool:
    return hasattr(vars(experts).get("forward"), "bricklab_own")


def leftovers(model) -> int:
    """Replaced forwards and hooks left on a MoE model's experts and their virtual sites (0 after a call)."""
    if not is_moe(model):
        return 0
    count = 0
    for experts in experts_modules(model):
        count += exposed(experts)
        for site in sites(experts):
            count += len(site._forward_pre_hooks) + len(site._forward_hooks)
    return count
