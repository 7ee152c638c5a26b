"""The Playground's first lesson: a functional brick switched off on a prompt it should matter for,
beside a random brick of the same size and layers as a control, and the verdict in one line."""

from __future__ import annotations

import numpy as np

from core.bricks.candidates import BrickParams, Candidate
from core.live.compare import Comparison

# Chosen on the default run (SmolLM2-135M-Instruct, 643 prompts), greedy, 12 new tokens: with the
# knowledge brick of the top 2% off the answer loses "Tokyo" (mean KL 5.7x that of a random brick of
# the same layers, which keeps it); at the paper's 5% the random control loses the fact too, and the
# plain model answers "The capital of France is" with French-looking noise.
PROMPT = "What is the capital of Japan?"
CATEGORY = "knowledge"  # the category whose brick the prompt needs
PARAMS = BrickParams(method="functional", percent=2.0, stability=False)  # one brick per category
NEW_TOKENS = 12
CLEAR = 3.0  # the brick's mean KL over the control's at which the effect counts as clear


def pick(bricks: list[Candidate], category: str = CATEGORY) -> Candidate | None:
    """The brick of `category` when it is labelled, else the most enriched labelled brick; None when
    no brick is labelled (a run without categories)."""
    labelled = [b for b in bricks if b.label]
    own = [b for b in labelled if b.label == category and b.brick_id.endswith(category)]
    return min(own or labelled, key=lambda b: min(b.p_values.values(), default=1.0), default=None)


def random_like(brick: Candidate, d_ff: int, seed: int = 0) -> Candidate:
    """The control: in each layer of `brick`, as many neurons of that layer drawn at random."""
    rng = np.random.default_rng(seed)
    layers, counts = np.unique(brick.neurons // d_ff, return_counts=True)
    drawn = [i * d_ff + rng.choice(d_ff, n, replace=False) for i, n in zip(layers, counts, strict=True)]
    neurons = np.sort(np.concatenate(drawn)).astype(np.int32)
    neurons.flags.writeable = False
    return Candidate(f"random-{brick.size}", "random", neurons, brick.layers, brick.size, None, {}, (), None)


def verdict(brick: Candidate, off: Comparison, control: Comparison) -> str:
    """One line: how far switching the brick off moves the output, against the random control."""
    ratio = off.mean_kl / max(control.mean_kl, 1e-9)
    answer = (
        f"the answer becomes “{off.configured_text.strip()[:60]}”"
        if off.first_divergence is not None
        else "the answer stays the same"
    )
    control_answer = "changes too" if control.first_divergence is not None else "stays the same"
    strength = "a clear effect" if ratio >= CLEAR and off.first_divergence is not None else "no clear effect"
    return (
        f"{strength.capitalize()}: switching off {brick.brick_id} ({brick.size:,} neurons) moves the "
        f"next-token distribution {ratio:,.1f}× as far as {brick.size:,} random neurons of the same "
        f"layers (mean KL {off.mean_kl:.3f} vs {control.mean_kl:.3f} nats); {answer}, while with the "
        f"random neurons off it {control_answer}."
    )
