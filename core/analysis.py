"""The paper's analysis of a captured run: sparsity, functionality scores, the ablation and overlap
matrices of the categories' top neurons, and recombination; each section cached in the store. The
ablation matrix without resident neurons (a control) is computed only on demand (ON_DEMAND).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from core import models
from core.bricks import scores
from core.errors import BricklabError
from core.live import evaluate
from core.progress import Progress
from core.store import Run, Store


@dataclass(frozen=True)
class ReportConfig:
    percent: float = 5.0  # each category's top share of all neurons (the paper's 5%)
    seed: int = 0  # seeds the selection / held-out split and the random control sets
    # 4 held-out prompts per category and 5 lowest-k points keep the first analysis of the default
    # run near a minute on 2 cores (issue #21); `thorough()` measures 8 and 10 (standard errors
    # ~1/1.41 as large, ~3x the time)
    eval_per_category: int = 4  # held-out prompts per category whose loss is measured
    sparsity_per_category: int = 1  # of those, prompts per category for the lowest-k curve
    ks: tuple[int, ...] = (0, 30, 50, 70, 90)  # % of neurons masked per token
    recombine: tuple[str, ...] = ("coding", "math")  # categories whose top neurons are kept
    recombine_percents: tuple[float, ...] = (5.0, 25.0, 50.0)  # per-category top shares kept
    max_tokens: int = 128  # tokens per prompt for the loss, chat template included
    batch_size: int = 64  # most prompts per forward pass (speed only; core.live.evaluate.passes)
    rule: str = "ap"  # how a category's top neurons are selected: one of core.bricks.scores.RULES

    def __post_init__(self):
        if not 0 < self.percent <= 100 or not all(0 < p <= 100 for p in self.recombine_percents):
            raise ValueError("percent and recombine_percents must be in (0, 100]")
        if min(self.eval_per_category, self.sparsity_per_category, self.max_tokens, self.batch_size) < 1:
            raise ValueError("prompt counts, max_tokens and batch_size must be >= 1")
        if not all(0 <= k < 100 for k in self.ks):
            raise ValueError("ks must lie in [0, 100)")
        if self.rule not in scores.RULES:
            raise ValueError(f"rule must be one of {scores.RULES}, got {self.rule!r}")

    def quick(self) -> ReportConfig:
        return replace(self, eval_per_category=3, sparsity_per_category=1, ks=(0, 30, 50, 70, 90))

    def thorough(self) -> ReportConfig:
        """Twice the held-out prompts and every 10% of the lowest-k curve (the defaults before #21)."""
        return replace(self, eval_per_category=8, sparsity_per_category=2, ks=tuple(range(0, 100, 10)))


SPLIT_NOTE = (
    "Prompts of each category are shuffled (seeded) and halved: neurons are selected on the first "
    "half only; losses are measured on prompts of the second (held-out) half. Perplexity is "
    "exp(mean over those prompts of each prompt's mean next-token loss on its own tokens)."
)


def split(labels: np.ndarray, n_categories: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(selection prompt indices, held-out prompt indices per category in a seeded order).

    Uncategorised prompts go to the selection half, where they count as "rest" for every category.
    """
    rng = np.random.default_rng(seed)
    selection, held = [np.flatnonzero(labels < 0)], []
    for c in range(n_categories):
        rows = rng.permutation(np.flatnonzero(labels == c))
        half = (len(rows) + 1) // 2
        selection.append(rows[:half])
        held.append(rows[half:])
    return np.sort(np.concatenate(selection)), held


def selection_scores(
    store: Store, run_id: str, rows: np.ndarray, labels: np.ndarray, n_cat: int, rule: str = "ap"
) -> np.ndarray:
    """The rule's scores (core.bricks.scores.rule_scores) from the given prompts only."""
    run = store.require_run(run_id)
    X = store.prompt_activations(run_id)[rows]
    return scores.rule_scores(X, labels[rows], n_cat, run.n_layers, rule)


VALIDATE_BANDS = 6  # "validated": a category's candidates (twice its share) cut into layer bands
VALIDATE_PROMPTS = 3  # "validated": selection-half prompts per category each band is measured on


class Analysis:
    """One run, one model, one configuration; every loss evaluation goes through `losses`."""

    def __init__(self, store: Store, lm, run_id: str | None, config: ReportConfig, progress: Progress | None):
        self.store, self.lm, self.config, self.progress = store, lm, config, progress
        self.run = store.require_run(run_id)
        if lm is not None:
            fix = f"Load '{self.run.model_id}' or pick a run of this model (`python -m core runs`)."
            models.check_match(self.run, lm.info, f"Run '{self.run.run_id}'", fix)
        self.labels, self.categories = scores.category_labels(store, self.run.run_id)
        if not self.categories:
            raise BricklabError(
                f"Run '{self.run.run_id}' has no prompt categories, so there is nothing to compare.",
                "Capture a prompt set whose prompts have a 'category' field.",
            )
        self.selection, self.held = split(self.labels, len(self.categories), config.seed)
        texts = [t for _, _, _, t in store.prompts(self.run.run_id)]
        self.eval_texts = [[texts[i] for i in h[: config.eval_per_category]] for h in self.held]
        chosen = [self.selection[self.labels[self.selection] == c] for c in range(len(self.categories))]
        self.selection_texts = [[texts[i] for i in rows[:VALIDATE_PROMPTS]] for rows in chosen]
        self.n_neurons = self.run.n_layers * self.run.d_ff
        self.done, self.planned = 0, 0
        self.counts: dict = {}  # what the evaluations cost: core.live.evaluate.loss_per_prompt's counts
        self._sets: dict = {}
        # mask key -> {prompt text: loss}: a prompt is measured once per mask (the unmasked one's key is
        # "base"), so equal sets, the shared baseline and subsets of measured prompts cost nothing
        self._known: dict = {}
        self._baselines: set = set()  # the unmasked evaluations asked for: each is one step of the plan
        # numba's OpenMP kernels (the scores) reset the process-wide thread count that torch shares
        self.threads = torch.get_num_threads()

    # --- loss -------------------------------------------------------------------------------

    def losses(self, per_layer: dict | None, per_category: int | None = None, texts=None) -> np.ndarray:
        """Mean loss per category over its evaluated held-out prompts (unmasked when `per_layer` is
        None, and then memoised per prompt), or over `texts` (a list of prompt lists per category)."""
        if per_layer is None:
            return self._losses("base", lambda: None, per_category, texts)
        return self._losses(None, lambda: per_layer, per_category, texts)

    def masked(self, per_layers: list[dict], per_category: int | None = None) -> np.ndarray:
        """`losses` under each of several masks (never memoised) in shared forward passes:
        (len(per_layers), categories)."""
        masks = [lambda m=m: m for m in per_layers]
        return self._losses_many([None] * len(per_layers), masks, per_category, None)

    def zeroed(self, ids, per_category: int | None = None, texts=None) -> np.ndarray:
        """`losses` with the given neurons zeroed; a set measured before is not measured again."""
        return self.zeroed_sets([ids], per_category, texts)[0]

    def zeroed_sets(self, sets: list, per_category: int | None = None, texts=None) -> np.ndarray:
        """`zeroed` of several sets in shared forward passes: (len(sets), categories)."""
        return self._memoised("zero", sets, per_category, texts)

    def kept(self, ids) -> np.ndarray:
        """`losses` with every neuron but the given ones zeroed (keep-only, run sparsely)."""
        return self.kept_sets([ids])[0]

    def kept_sets(self, sets: list) -> np.ndarray:
        """`kept` of several sets in shared forward passes: (len(sets), categories)."""
        return self._memoised("keep", sets, None, None)

    def _memoised(self, how: str, sets: list, per_category, texts) -> np.ndarray:
        n, d = self.run.n_layers, self.run.d_ff
        make = evaluate.masked_neurons if how == "zero" else evaluate.kept_neurons
        unique = [np.unique(np.asarray(ids, dtype=np.int64)) for ids in sets]
        keys = [(how, ids.tobytes()) for ids in unique]
        return self._losses_many(
            keys, [lambda ids=ids: make(n, d, ids) for ids in unique], per_category, texts
        )

    def _losses(self, key, mask: Callable[[], dict | None], per_category: int | None, texts) -> np.ndarray:
        """Per category, the mean loss of its prompts under `mask()`; prompts already measured under
        `key` (None: never memoised) are not measured again."""
        return self._losses_many([key], [mask], per_category, texts)[0]

    def measure_baseline(self) -> None:
        """Memoise the unmasked losses of every held-out prompt, outside the plan's steps: a section that
        needs only some of them first (the sparsity curve) then finds them, instead of running its own
        passes before the whole set's."""
        self._losses_many(["base"], [lambda: None], None, None, counted=False)

    def _losses_many(
        self, keys: list, masks: list[Callable[[], dict | None]], per_category, texts, counted: bool = True
    ) -> np.ndarray:
        """`_losses` of several masks, (len(keys), categories): the masks with prompts to measure share
        their forward passes (core.live.evaluate.losses_under)."""
        # the plan (`planned`) counts each masked call and each baseline once, measured or not
        baseline = (per_category, texts is None)
        steps = sum(key != "base" or baseline not in self._baselines for key in keys) if counted else 0
        if counted:
            self._baselines.add(baseline)
        texts = [t[:per_category] for t in (self.eval_texts if texts is None else texts)]
        flat = list(dict.fromkeys(t for group in texts for t in group))
        known = [self._known.setdefault(key, {}) if key is not None else {} for key in keys]
        todo: dict[int, tuple] = {}  # id of a memo (equal keys share one) -> (memo, the mask measuring it)
        for memo, mask in zip(known, masks, strict=True):
            if any(t not in memo for t in flat):
                todo.setdefault(id(memo), (memo, mask))
        if todo:
            torch.set_num_threads(self.threads)
            c = self.config
            wanted = [t for t in flat if any(t not in memo for memo, _ in todo.values())]

            def on_pass(done: int, total: int) -> None:
                if self.progress and steps:
                    self.progress(self.done + steps * done // total, self.planned, "evaluating")

            loss = evaluate.losses_under(
                self.lm, wanted, [mask() for _, mask in todo.values()], c.batch_size,
                max_tokens=c.max_tokens, counts=self.counts, on_pass=on_pass,
            )  # fmt: skip
            for (memo, _), row in zip(todo.values(), loss, strict=True):
                memo.update({t: v for t, v in zip(wanted, row, strict=True) if t not in memo})
        if steps:
            self.done += steps
            if self.progress:
                self.progress(self.done, self.planned, "evaluating")
        return np.array([
            [np.nanmean([memo[t] for t in group]) if group else np.nan for group in texts] for memo in known
        ])  # fmt: skip

    def top_sets(self, percent: float, exclude_resident: bool = False, rule: str | None = None) -> list:
        """Per category, the sorted global ids of its top `percent`% neurons under the rule."""
        rule = rule or self.config.rule
        exclude_resident = exclude_resident or rule == "no_resident"
        key = (percent, exclude_resident, rule)
        if key not in self._sets:
            exclude = scores.resident_neurons(self.store, self.run.run_id) if exclude_resident else None
            if rule == "validated":
                self._sets[key], self._sets["validated", key] = self._validated(percent, exclude)
            else:
                self._sets[key] = scores.top_neurons(self._scores(rule), percent, exclude)
        return self._sets[key]

    def _scores(self, rule: str) -> np.ndarray:
        name = "ap" if rule in ("no_resident", "validated") else rule
        if ("scores", name) not in self._sets:
            n_cat = len(self.categories)
            picked = selection_scores(self.store, self.run.run_id, self.selection, self.labels, n_cat, name)
            self._sets["scores", name] = picked
        return self._sets["scores", name]

    def _validated(self, percent: float, exclude) -> tuple[list[np.ndarray], list[int]]:
        """Twice the share of candidates by average precision, cut per category into VALIDATE_BANDS
        layer bands; each band is zeroed on its own over selection-half prompts, and the bands whose
        zeroing raises the own category's loss most above the others' mean fill the set, the last
        band's neurons by score. Also returns, per category, the neurons from bands where own > others."""
        ap = self._scores("ap")
        k = scores.top_neurons(ap, percent, exclude)[0].size
        wide = scores.top_neurons(ap, min(2 * percent, 100), exclude)
        base = self.losses(None, texts=self.selection_texts)
        out, validated = [], []
        for c, ids in enumerate(wide):
            bands = [b for b in np.array_split(ids, VALIDATE_BANDS) if b.size]
            increases = np.expm1(self.zeroed_sets(bands, texts=self.selection_texts) - base)
            margins = [increase[c] - np.nanmean(np.delete(increase, c)) for increase in increases]
            picked, passed = [], 0
            for g in np.argsort(-np.nan_to_num(margins, nan=-np.inf), kind="stable"):
                band = bands[g][np.argsort(-ap[c, bands[g]], kind="stable")][: k - len(picked)]
                picked.extend(band.tolist())
                passed += band.size if margins[g] > 0 else 0
            out.append(np.sort(np.asarray(picked, dtype=np.int64)).astype(np.int32))
            validated.append(passed)
        return out, validated

    def random_set(self, size: int, salt: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, salt])
        return np.sort(rng.choice(self.n_neurons, size=size, replace=False))

    # --- sections ---------------------------------------------------------------------------

    def sparsity(self) -> dict:
        out = {"indicators": {}}
        for name, array in (("abs", "hist_abs"), ("output", "hist_out")):
            hist = self.store.layer_array(self.run.run_id, array, np.int64).astype(np.float64)
            cdf = np.cumsum(hist, axis=1) / np.maximum(hist.sum(axis=1, keepdims=True), 1)
            out["indicators"][name] = {
                "cdf": cdf.round(5).tolist(),
                "share_below_0.2": cdf[:, 19].round(4).tolist(),
            }
        out["bins"] = int(hist.shape[1])
        per = self.config.sparsity_per_category
        norms = [models.down_column_norms(self.lm.model, layer) for layer in range(self.run.n_layers)]
        base = float(np.nanmean(self.losses(None, per)))
        names, ks = ("abs", "output"), [k for k in self.config.ks if k]
        masks = [evaluate.lowest_k_mask(k / 100, name, norms) for name in names for k in ks]
        measured = iter(np.nanmean(self.masked(masks, per), axis=1).tolist())  # every mask in shared passes
        for name in names:
            out["indicators"][name]["loss"] = [next(measured) if k else base for k in self.config.ks]
        out.update(ks=list(self.config.ks), prompts_per_category=per)
        return out

    def functionality(self) -> dict:
        out = {"categories": self.categories}
        for key, shuffled in (("real", False), ("shuffled", True)):
            s = scores.functionality_scores(
                self.store, self.run.run_id, shuffled=shuffled, seed=self.config.seed
            )
            s = s.reshape(len(self.categories), self.run.n_layers, self.run.d_ff)
            out[key] = {
                "best": np.nanmax(s, axis=2).round(4).tolist(),
                "top_0.5pct": np.nanquantile(s, 0.995, axis=2).round(4).tolist(),
                "mean": np.nanmean(s, axis=2).round(4).tolist(),
            }
        return out

    def ablation(self, exclude_resident: bool) -> dict:
        sets = self.top_sets(self.config.percent, exclude_resident)
        base = self.losses(None)
        *rows, control = self.zeroed_sets([*sets, self.random_set(len(sets[0]), 1)])
        increase = lambda loss: (100 * np.expm1(loss - base)).round(2).tolist()  # noqa: E731
        matrix, random_row = increase(np.array(rows)), increase(control)
        excluded = exclude_resident or self.config.rule == "no_resident"
        out = {
            "categories": self.categories,
            "rule": self.config.rule,
            "rule_note": scores.RULE_NOTES[self.config.rule],
            "increase_pct": matrix,
            "random": random_row,
            "diagonal_dominant": diagonal_dominance(matrix, random_row),
            "selectivity": scores.selectivity(matrix),
            "baseline_ppl": np.exp(base).round(3).tolist(),
            "neurons_per_category": len(sets[0]),
            "excluded_resident": len(scores.resident_neurons(self.store, self.run.run_id)) if excluded else 0,
            "eval_prompts_per_category": [len(t) for t in self.eval_texts],
            "split": SPLIT_NOTE,
        }
        if self.config.rule == "validated":
            out["validated_neurons"] = self._sets["validated", (self.config.percent, excluded, "validated")]
        return out

    def overlap(self) -> dict:
        sets = self.top_sets(self.config.percent)
        n = len(sets)
        matrix = [[len(np.intersect1d(sets[i], sets[j])) / max(min(len(sets[i]), len(sets[j])), 1)
                   for j in range(n)] for i in range(n)]  # fmt: skip
        return {
            "categories": self.categories,
            "rule": self.config.rule,
            "measure": "overlap coefficient |A & B| / min(|A|, |B|)",
            "matrix": np.round(matrix, 4).tolist(),
            "random_expectation": round(len(sets[0]) / self.n_neurons, 4),
        }

    def recombination(self) -> dict:
        chosen = [c for c in self.config.recombine if c in self.categories] or self.categories[:2]
        # "validated" measures bands per share; at the larger shares that would cost more than the rest
        rule = "ap" if self.config.rule == "validated" else self.config.rule
        base = self.losses(None)
        unions = []
        for percent in self.config.recombine_percents:
            sets = self.top_sets(percent, rule=rule)
            unions.append(np.unique(np.concatenate([sets[self.categories.index(c)] for c in chosen])))
        kept = list(self.kept_sets([*unions, *(self.random_set(len(union), 2) for union in unions)]))
        rows = [{
            "percent": percent,
            "share_kept": round(len(union) / self.n_neurons, 4),
            "loss": loss.round(4).tolist(),
            "random_loss": random.round(4).tolist(),
        } for percent, union, loss, random in zip(
            self.config.recombine_percents, unions, kept[: len(unions)], kept[len(unions) :], strict=True
        )]  # fmt: skip
        return {
            "kept": chosen,
            "rule": rule,
            "categories": self.categories,
            "baseline_loss": base.round(4).tolist(),
            "rows": rows,
        }


def diagonal_dominance(matrix: list[list[float]], random_row: list[float]) -> list[bool]:
    """Per category: own increase > mean increase on the other categories, and > the random row's."""
    m = np.asarray(matrix, dtype=np.float64)
    n = len(m)
    if n < 2:
        return [bool(m[0, 0] > random_row[0])] if n else []
    others = (m.sum(axis=1) - np.diag(m)) / (n - 1)
    return [bool(m[i, i] > others[i] and m[i, i] > random_row[i]) for i in range(n)]


# name -> (config fields its result depends on, masked evaluations it runs, its baseline or None)
SECTIONS: dict[str, tuple[tuple[str, ...], Callable[[ReportConfig, int], int], str | None]] = {
    "sparsity": (("seed", "eval_per_category", "sparsity_per_category", "ks", "max_tokens"),
                 lambda c, n: 2 * sum(k > 0 for k in c.ks), "sparsity"),
    "functionality": (("seed",), lambda c, n: 0, None),
    "ablation_matrix": (("percent", "seed", "eval_per_category", "max_tokens", "rule"),
                        lambda c, n: n + 1, "full"),
    "ablation_matrix_no_resident": (("percent", "seed", "eval_per_category", "max_tokens", "rule"),
                                    lambda c, n: n + 1, "full"),
    "overlap": (("percent", "seed", "rule"), lambda c, n: 0, None),
    "recombination": (("seed", "eval_per_category", "recombine", "recombine_percents", "max_tokens", "rule"),
                      lambda c, n: 2 * len(c.recombine_percents), "full"),
}  # fmt: skip
# Computed only when asked for (`extra=`): the ablation matrix again without resident neurons is a
# control that costs as much as the matrix itself, so a preparation and a first report leave it out
ON_DEMAND = ("ablation_matrix_no_resident",)
ALWAYS = tuple(name for name in SECTIONS if name not in ON_DEMAND)


def _params(config: ReportConfig) -> dict[str, dict]:
    values = json.loads(json.dumps(asdict(config)))
    return {name: {f: values[f] for f in fields} for name, (fields, _, _) in SECTIONS.items()}


def default_run(store: Store) -> Run:
    """The run a report takes when none is named: the largest complete run (most prompts, the
    newest among equals), since a small run leaves categories without held-out prompts."""
    done = [r for r in store.runs() if r.complete]
    if not done:
        store.require_run(None)  # its error says there is none and how to capture one
    return max(done, key=lambda r: r.n_prompts)


def _wanted(extra: tuple[str, ...]) -> list[str]:
    unknown = set(extra) - set(ON_DEMAND)
    if unknown:
        raise ValueError(f"extra sections must be among {ON_DEMAND}, got {sorted(unknown)}")
    return [name for name in SECTIONS if name in ALWAYS or name in extra]


def missing_sections(
    store: Store,
    run_id: str | None = None,
    config: ReportConfig = ReportConfig(),
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Sections not cached yet for this run and configuration (those need the model): the ALWAYS
    sections, and the ON_DEMAND ones named in `extra`."""
    run = store.require_run(run_id)
    params = _params(config)
    return [n for n in _wanted(extra) if store.get_result(run.run_id, f"analysis.{n}", params[n]) is None]


def planned(config: ReportConfig, n_categories: int, sections) -> int:
    """Progress steps (evaluations counted by Analysis.done) that computing `sections` takes."""
    baselines = {SECTIONS[name][2] for name in sections} - {None}
    steps = len(baselines) + sum(SECTIONS[name][1](config, n_categories) for name in sections)
    if config.rule == "validated":  # a selection-half baseline, and the bands of each top set selected
        plain = bool({"ablation_matrix", "overlap"} & set(sections))
        variants = plain + ("ablation_matrix_no_resident" in sections)  # with and without resident neurons
        steps += bool(variants) + variants * n_categories * VALIDATE_BANDS
    return steps


def prompt_evaluations(config: ReportConfig, n_categories: int, sections) -> int:
    """Held-out prompts run through the model (masked or not) to compute `sections`: what their
    time grows with, e.g. to estimate one section's share of a measured analysis."""
    per = {"sparsity": config.sparsity_per_category, "full": config.eval_per_category}
    baselines = {SECTIONS[name][2] for name in sections} - {None}
    masked = sum(SECTIONS[name][1](config, n_categories) * per.get(SECTIONS[name][2], 0) for name in sections)
    return n_categories * (masked + sum(per[b] for b in baselines))


def report(
    store: Store,
    lm,
    run_id: str | None = None,
    config: ReportConfig = ReportConfig(),
    progress: Progress | None = None,
    counts: dict | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """Every section of the analysis as one JSON-ready dict; cached sections compute nothing.

    The ALWAYS sections are computed when missing, the ON_DEMAND ones only when named in `extra`
    (e.g. `extra=ON_DEMAND`); an ON_DEMAND section neither cached nor asked for is None.
    `lm` is needed only for sections that are not cached yet (it may be None when all are). `counts`,
    when given, receives what the evaluations cost (core.live.evaluate.loss_per_prompt's counts).
    """
    run = store.require_run(run_id)
    params = _params(config)
    out = {name: store.get_json(run.run_id, f"analysis.{name}", params[name]) for name in SECTIONS}
    missing = [name for name in _wanted(extra) if out[name] is None]
    if missing:
        if lm is None:
            raise BricklabError(
                f"Sections {missing} are not cached yet and need the model.", "Pass the loaded model."
            )
        analysis = Analysis(store, lm, run.run_id, config, progress)
        if counts is not None:
            analysis.counts = counts
        analysis.planned = planned(config, len(analysis.categories), missing)
        if "sparsity" in missing and any(SECTIONS[name][2] == "full" for name in missing):
            analysis.measure_baseline()  # the sparsity curve's baseline prompts join the full set's passes
        for name in missing:
            result = _compute(analysis, name)
            result = _finite(result)
            store.put_json(run.run_id, f"analysis.{name}", params[name], result)
            out[name] = result
    a = out["ablation_matrix"]
    return {
        "run_id": run.run_id,
        "model_id": run.model_id,
        "config": json.loads(json.dumps(asdict(config))),
        "rule": config.rule,
        "selectivity": dict(zip(a["categories"], scores.selectivity(a["increase_pct"]), strict=True)),
        **out,
    }


def _finite(value):
    """NaN (e.g. a category without held-out prompts) becomes null, so the JSON stays standard."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _compute(analysis: Analysis, name: str) -> dict:
    if name == "ablation_matrix":
        return analysis.ablation(exclude_resident=False)
    if name == "ablation_matrix_no_resident":
        return analysis.ablation(exclude_resident=True)
    return getattr(analysis, name)()


# --- verdicts: each claim of the paper, held against this run's numbers, in words -------------------

SELECTIVITY_NOTE = (
    "Selectivity is a category's own perplexity increase divided by the mean increase its neurons cause "
    "on the other categories: 1 means no specialisation, 10 means ten times more harm to its own prompts."
)


def verdicts(r: dict) -> dict[str, dict]:
    """Per section of a report: {"holds": True / False / None (not measurable on this run), "text"}."""
    return {
        "sparsity": _sparsity_verdict(r["sparsity"]),
        "functionality": _functionality_verdict(r["functionality"]),
        "ablation_matrix": _ablation_verdict(r["ablation_matrix"]),
        "overlap": _overlap_verdict(r["overlap"]),
        "recombination": _recombination_verdict(r["recombination"]),
    }


def _verdict(holds: bool | None, text: str) -> dict:
    word = {True: "Holds", False: "Does not hold", None: "Not measurable"}[holds]
    return {"holds": holds, "text": f"{word} on this run: {text}"}


def _sparsity_verdict(s: dict) -> dict:
    below = float(np.mean(s["indicators"]["abs"]["share_below_0.2"]))
    ks, loss = s["ks"], s["indicators"]["abs"]["loss"]
    if 0 not in ks or 70 not in ks or loss[ks.index(0)] is None or loss[ks.index(70)] is None:
        return _verdict(None, f"{below:.0%} of neurons sit under 0.2 of the per-token maximum (paper ~80%).")
    rise = float(np.expm1(loss[ks.index(70)] - loss[ks.index(0)]))
    holds = below >= 0.5 and rise <= 0.10
    return _verdict(
        holds,
        f"{below:.0%} of neurons sit under 0.2 of the per-token maximum (paper ~80%); zeroing the lowest 70% "
        f'by |a| per token changes perplexity by {rise:+.0%} ("barely" taken as at most +10%).',
    )


def _functionality_verdict(f: dict) -> dict:
    real = np.nanmean(np.asarray(f["real"]["top_0.5pct"], dtype=float), axis=0)  # per layer
    fake = np.nanmean(np.asarray(f["shuffled"]["top_0.5pct"], dtype=float), axis=0)
    above = int(np.sum(real > fake))
    ratio = float(np.nanmean(real) / np.nanmean(fake)) if np.nanmean(fake) > 0 else float("nan")
    return _verdict(
        above == len(real),
        f"the top 0.5% scores with real labels beat shuffled labels in {above} of {len(real)} layers "
        f"({ratio:.1f}× on average).",
    )


def _ablation_verdict(a: dict) -> dict:
    names, sel = a["categories"], a["selectivity"]
    n_dom = sum(a["diagonal_dominant"])
    parts = [f"{c} {'n/a' if v is None else f'{v:.1f}'}" for c, v in zip(names, sel, strict=True)]
    if all(v is None for v in sel) and not n_dom:
        return _verdict(None, "no category could be measured (too few held-out prompts).")
    weak = [
        c
        for c, v, d in zip(names, sel, a["diagonal_dominant"], strict=True)
        if not d or (v is not None and v < 2)
    ]
    text = (
        f"zeroing a category's top neurons hurts it more than the others for {n_dom} of {len(names)} "
        "categories; "
        f"selectivity {', '.join(parts)} (rule {a.get('rule', 'ap')})."
    )
    if weak:
        text += f" Not separated: {', '.join(weak)}."
    return _verdict(n_dom == len(names), text)


def _overlap_verdict(o: dict) -> dict:
    m = np.asarray(o["matrix"], dtype=float)
    off = m[~np.eye(len(m), dtype=bool)]
    if not off.size:
        return _verdict(None, "a single category has nothing to overlap with.")
    mean, top, chance = float(off.mean()), float(off.max()), o["random_expectation"]
    return _verdict(
        mean <= 2 * chance,
        f"the sets of two categories share {mean:.2f} of their neurons on average (at most {top:.2f}); "
        f'random sets would share {chance:.2f} (the paper: 0.00–0.09 against 0.05; "barely" taken as '
        f"at most twice random).",
    )


def _recombination_verdict(rc: dict) -> dict:
    kept = [rc["categories"].index(c) for c in rc["kept"]]
    wins, losses, unknown = [], [], False
    for row in rc["rows"]:
        for i in kept:
            mine, rand = row["loss"][i], row["random_loss"][i]
            if mine is None or rand is None:
                unknown = True
                continue
            cell = f"{rc['categories'][i]} at {row['percent']:g}% ({mine:.2f} vs random {rand:.2f})"
            (wins if mine < rand else losses).append(cell)
    if not wins and not losses:
        return _verdict(None, "no kept category has a held-out prompt.")
    text = (
        f"keeping only {' + '.join(rc['kept'])}'s top neurons gives a lower loss than as many random neurons "
    )
    text += f"in {len(wins)} of {len(wins) + len(losses)} cases"
    text += f"; it loses to random for {', '.join(losses)}." if losses else "."
    return _verdict(False if losses else (None if unknown else True), text)
