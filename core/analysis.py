"""The paper's analysis of a captured run: sparsity, functionality scores, the ablation and overlap
matrices of the categories' top neurons, and recombination; each section cached in the store.
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
from core.kernels import coact as kernels
from core.live import evaluate
from core.progress import Progress
from core.store import Run, Store


@dataclass(frozen=True)
class ReportConfig:
    percent: float = 5.0  # each category's top share of all neurons (the paper's 5%)
    seed: int = 0  # seeds the selection / held-out split and the random control sets
    eval_per_category: int = 8  # held-out prompts per category whose loss is measured
    sparsity_per_category: int = 2  # of those, prompts per category for the lowest-k curve
    ks: tuple[int, ...] = tuple(range(0, 100, 10))  # % of neurons masked per token
    recombine: tuple[str, ...] = ("coding", "math")  # categories whose top neurons are kept
    recombine_percents: tuple[float, ...] = (5.0, 25.0, 50.0)  # per-category top shares kept
    max_tokens: int = 128  # tokens per prompt for the loss, chat template included
    batch_size: int = 16  # prompts per forward pass (speed only)

    def __post_init__(self):
        if not 0 < self.percent <= 100 or not all(0 < p <= 100 for p in self.recombine_percents):
            raise ValueError("percent and recombine_percents must be in (0, 100]")
        if min(self.eval_per_category, self.sparsity_per_category, self.max_tokens, self.batch_size) < 1:
            raise ValueError("prompt counts, max_tokens and batch_size must be >= 1")
        if not all(0 <= k < 100 for k in self.ks):
            raise ValueError("ks must lie in [0, 100)")

    def quick(self) -> ReportConfig:
        return replace(self, eval_per_category=3, sparsity_per_category=1, ks=(0, 30, 50, 70, 90))


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
    store: Store, run_id: str, rows: np.ndarray, labels: np.ndarray, n_cat: int
) -> np.ndarray:
    """Functionality scores (AP, one category vs rest) from the given prompts only."""
    sub = labels[rows]
    X = store.prompt_activations(run_id)[rows]
    return kernels.average_precision(X, np.where(sub < 0, n_cat, sub), n_cat + 1)[:n_cat]


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
        self.n_neurons = self.run.n_layers * self.run.d_ff
        self.done, self.planned = 0, 0
        self._sets: dict = {}
        self._baselines: dict = {}
        # numba's OpenMP kernels (the scores) reset the process-wide thread count that torch shares
        self.threads = torch.get_num_threads()

    # --- loss -------------------------------------------------------------------------------

    def losses(self, per_layer: dict | None, per_category: int | None = None) -> np.ndarray:
        """Mean loss per category over its evaluated held-out prompts (the unmasked one memoised)."""
        if per_layer is None:
            if per_category not in self._baselines:
                self._baselines[per_category] = self._losses(None, per_category)
            return self._baselines[per_category]
        return self._losses(per_layer, per_category)

    def _losses(self, per_layer: dict | None, per_category: int | None) -> np.ndarray:
        torch.set_num_threads(self.threads)
        texts = [t[:per_category] for t in self.eval_texts]
        flat = [t for group in texts for t in group]
        loss = evaluate.loss_per_prompt(
            self.lm, flat, self.config.batch_size, per_layer, max_tokens=self.config.max_tokens
        )
        bounds = np.cumsum([0] + [len(t) for t in texts])
        self.done += 1
        if self.progress:
            self.progress(self.done, self.planned, "evaluating")
        return np.array(
            [np.nanmean(loss[a:b]) if b > a else np.nan for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )

    def masked(self, ids) -> dict:
        return evaluate.masked_neurons(self.run.n_layers, self.run.d_ff, ids)

    def top_sets(self, percent: float, exclude_resident: bool = False) -> list[np.ndarray]:
        key = (percent, exclude_resident)
        if key not in self._sets:
            if "scores" not in self._sets:
                self._sets["scores"] = selection_scores(
                    self.store, self.run.run_id, self.selection, self.labels, len(self.categories)
                )
            exclude = scores.resident_neurons(self.store, self.run.run_id) if exclude_resident else None
            self._sets[key] = scores.top_neurons(self._sets["scores"], percent, exclude)
        return self._sets[key]

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
        for name in ("abs", "output"):
            masks = [evaluate.lowest_k_mask(k / 100, name, norms) if k else None for k in self.config.ks]
            curve = [base if m is None else float(np.nanmean(self.losses(m, per))) for m in masks]
            out["indicators"][name]["loss"] = curve
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
        rows = [self.losses(self.masked(ids)) for ids in sets]
        control = self.losses(self.masked(self.random_set(len(sets[0]), 1)))
        increase = lambda loss: (100 * np.expm1(loss - base)).round(2).tolist()  # noqa: E731
        matrix, random_row = increase(np.array(rows)), increase(control)
        return {
            "categories": self.categories,
            "increase_pct": matrix,
            "random": random_row,
            "diagonal_dominant": diagonal_dominance(matrix, random_row),
            "baseline_ppl": np.exp(base).round(3).tolist(),
            "neurons_per_category": len(sets[0]),
            "excluded_resident": len(scores.resident_neurons(self.store, self.run.run_id))
            if exclude_resident
            else 0,
            "eval_prompts_per_category": [len(t) for t in self.eval_texts],
            "split": SPLIT_NOTE,
        }

    def overlap(self) -> dict:
        sets = self.top_sets(self.config.percent)
        n = len(sets)
        matrix = [[len(np.intersect1d(sets[i], sets[j])) / max(min(len(sets[i]), len(sets[j])), 1)
                   for j in range(n)] for i in range(n)]  # fmt: skip
        return {
            "categories": self.categories,
            "measure": "overlap coefficient |A & B| / min(|A|, |B|)",
            "matrix": np.round(matrix, 4).tolist(),
            "random_expectation": round(len(sets[0]) / self.n_neurons, 4),
        }

    def recombination(self) -> dict:
        chosen = [c for c in self.config.recombine if c in self.categories] or self.categories[:2]
        base = self.losses(None)
        rows = []
        for percent in self.config.recombine_percents:
            sets = self.top_sets(percent)
            union = np.unique(np.concatenate([sets[self.categories.index(c)] for c in chosen]))
            keep = lambda ids: evaluate.kept_neurons(self.run.n_layers, self.run.d_ff, ids)  # noqa: E731
            rows.append({
                "percent": percent,
                "share_kept": round(len(union) / self.n_neurons, 4),
                "loss": self.losses(keep(union)).round(4).tolist(),
                "random_loss": self.losses(keep(self.random_set(len(union), 2))).round(4).tolist(),
            })  # fmt: skip
        return {
            "kept": chosen,
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
    "ablation_matrix": (("percent", "seed", "eval_per_category", "max_tokens"), lambda c, n: n + 1, "full"),
    "ablation_matrix_no_resident": (("percent", "seed", "eval_per_category", "max_tokens"),
                                    lambda c, n: n + 1, "full"),
    "overlap": (("percent", "seed"), lambda c, n: 0, None),
    "recombination": (("seed", "eval_per_category", "recombine", "recombine_percents", "max_tokens"),
                      lambda c, n: 2 * len(c.recombine_percents), "full"),
}  # fmt: skip


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


def missing_sections(
    store: Store, run_id: str | None = None, config: ReportConfig = ReportConfig()
) -> list[str]:
    """Sections not cached yet for this run and configuration (those need the model)."""
    run = store.require_run(run_id)
    return [n for n, p in _params(config).items() if store.get_result(run.run_id, f"analysis.{n}", p) is None]


def report(
    store: Store,
    lm,
    run_id: str | None = None,
    config: ReportConfig = ReportConfig(),
    progress: Progress | None = None,
) -> dict:
    """Every section of the analysis as one JSON-ready dict; cached sections compute nothing.

    `lm` is needed only for sections that are not cached yet (it may be None when all are).
    """
    run = store.require_run(run_id)
    params = _params(config)
    out = {name: store.get_json(run.run_id, f"analysis.{name}", params[name]) for name in SECTIONS}
    missing = [name for name, cached in out.items() if cached is None]
    if missing:
        if lm is None:
            raise BricklabError(
                f"Sections {missing} are not cached yet and need the model.", "Pass the loaded model."
            )
        analysis = Analysis(store, lm, run.run_id, config, progress)
        n_cat = len(analysis.categories)
        baselines = {SECTIONS[name][2] for name in missing} - {None}
        analysis.planned = len(baselines) + sum(SECTIONS[name][1](config, n_cat) for name in missing)
        for name in missing:
            result = _compute(analysis, name)
            result = _finite(result)
            store.put_json(run.run_id, f"analysis.{name}", params[name], result)
            out[name] = result
    return {
        "run_id": run.run_id,
        "model_id": run.model_id,
        "config": json.loads(json.dumps(asdict(config))),
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
