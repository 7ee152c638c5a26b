"""Plain-language explanations for the Paper page: what the paper claims and how to read each chart."""

from core import analysis
from core.bricks import scores
from ui import text

INTRO = (
    "Xiao et al. (2024), *Configurable Foundation Models*, argue that an LLM's feed-forward neurons "
    "behave like bricks: few are active at a time, many specialise, and a category's neurons can be "
    "removed or kept on their own. Here each claim is measured on this run."
)

SPARSITY = (
    "**The claim.** For any one token, only a few neurons matter: about 80% of neurons have an activation "
    "under a fifth of the strongest one, and zeroing the weakest ~70% (by |a|) or ~80% (by output "
    "magnitude |a|·‖W_down column‖) at each token hardly changes the loss. "
    "**Read the charts.** Left: a curve that rises steeply near 0 means most neurons are nearly silent. "
    "Right: the loss stays flat while k grows, then climbs; the later it climbs, the sparser the model."
)

FUNCTIONALITY = (
    "**The claim.** Many neurons are specialists: ranking the prompts by a neuron's activation separates "
    "one category (coding, math, …) from the rest far better than chance. The score is the average "
    "precision of that ranking. "
    "**Read the chart.** Solid real-label curves far above the shuffled-label curves (the chance level "
    "for the same data) mean that specialists exist in those layers."
)

ABLATION = (
    "**The claim.** Zeroing the top 5% neurons of one category raises *that* category's perplexity far "
    "more than the others' (Llama-3 coding: +112%, other categories ≤ 8%). Neurons are chosen on one "
    "half of the prompts and the loss is measured on the other half. "
    "**Read the matrix.** Each row zeroes one category's neurons; each column measures one category. "
    "A dark diagonal means the categories live in separate neurons; the last row zeroes as many random "
    "neurons, for comparison."
)

OVERLAP = (
    "**The claim.** The top neurons of different categories are mostly different neurons: the paper "
    "finds overlaps of 0.00–0.09, around what random sets would share (0.05). "
    "**Read the matrix.** 1 on the diagonal; small numbers elsewhere mean separate bricks per category."
)

RECOMBINATION = (
    "**The claim.** If categories live in separate neurons, keeping only the neurons of some categories "
    "should keep those categories working better than keeping as many random neurons. "
    "**Read the table.** Mean loss per category (lower is better): compare each kept row with the random "
    "row under it, column by column."
)

COMPUTE_NOTE = (
    "The analysis runs the model over held-out prompts with neurons masked, in the background "
    "(leaving the page does not stop it); it is cached afterwards."
)

RESIDENT_TOGGLE = "Exclude neurons active for every category (resident neurons)"
RESIDENT_BUTTON = "Compute the matrix without resident neurons"
RESIDENT_NOTE = (
    "Resident neurons are strongly active on most prompts of every category. Leaving them out of each "
    "category's top neurons is a control: if the diagonal stays, the categories' own neurons cause it. "
    "It measures as many masked models as the matrix itself, so it is computed only when asked for, "
    "in the background (leaving the page does not stop it), and cached."
)


def compute_label(n_missing: int, quick: bool) -> str:
    """The Compute button's label; it names the quick variant, so the label changes with the toggle."""
    return f"Compute the {'quick ' if quick else ''}analysis: {n_missing} sections need the model"


ROUTING = (
    "**The promise.** If a model's knowledge sits in bricks, it need not run all of them for every input: "
    "a *router* picks the bricks an input needs, and the skipped neurons are not computed at all, which "
    "saves real time. **The routers.** *static* runs one fixed set for every input; *category* guesses "
    "the prompt's category from its first layers and runs that category's neurons; *token · oracle* "
    "picks, per token, the bricks with the most activation (it has to compute them all to know, so it "
    "shows the best quality token routing could reach); *token · learned* predicts those bricks with a small "
    "map. **Read the chart.** Each line is one router at budgets from 20% to 80% of each layer's "
    "neurons: left is less compute, up is worse quality, and the star is the full model. A line that "
    "stays near 1 far to the left means the work of the model really splits into bricks; try one in the "
    "Playground's auto mode."
)


def verdict(v: dict) -> str:
    """A claim's verdict on this run (core.analysis.verdicts) as one Markdown line."""
    icon = {True: "✅", False: "❌", None: "➖"}[v["holds"]]
    return f"{icon} **{text.md(v['text'])}**"


def selectivity_table(a: dict) -> list[dict]:
    """One row per category: its selectivity beside its own increase and the others' mean."""
    rows = []
    for i, (name, value) in enumerate(zip(a["categories"], a["selectivity"], strict=True)):
        row = a["increase_pct"][i]
        others = [v for j, v in enumerate(row) if j != i and v is not None]
        rows.append({
            "category": name,
            "own increase %": row[i],
            "mean on the others %": round(sum(others) / len(others), 2) if others else None,
            "selectivity": value,
            "diagonal dominates": a["diagonal_dominant"][i],
        })  # fmt: skip
    return rows


def selectivity_caption(a: dict) -> str:
    rule = a.get("rule", "ap")
    return text.md(f"{analysis.SELECTIVITY_NOTE} Selection rule: {rule} ({scores.RULE_NOTES[rule]}).")
