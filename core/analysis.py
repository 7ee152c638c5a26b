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
from core.store import Store

Progress = Callable[[int, int, str], None]  # (evaluations done, evaluations planned, message)


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
        if lm is not None and lm.info.fingerprint != self.run.fingerprint:
            raise BricklabError(
                f"The loaded model ({lm.info.model_id}) is not the model run '{self.run.run_id}' captured.",
                f"Load '{self.run.model_id}' or pick a run of this model (`python -m core runs`).",
            )
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
    out = {name: store.get_result(run.run_id, f"analysis.{name}", params[name]) for name in SECTIONS}
    missing = [name for name, payload in out.items() if payload is None]
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
            store.put_result(run.run_id, f"analysis.{name}", params[name], json.dumps(result).encode())
            out[name] = result
    out = {name: json.loads(v) if isinstance(v, bytes) else v for name, v in out.items()}
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


# --- command line -------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="the paper's analysis of a run: sparsity, scores, ablation matrix"
    )
    p.add_argument("--run", help="run id (default: the newest complete run)")
    p.add_argument("--json", action="store_true", help="also print everything as one JSON object, last line")
    p.add_argument(
        "--quick", action="store_true", help="fewer held-out prompts and k values (rougher numbers)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.db)
    run = store.require_run(args.run)
    config = ReportConfig().quick() if args.quick else ReportConfig()
    bar = tqdm(unit="eval", desc="report", disable=args.quiet)

    def progress(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    lm = None
    if missing_sections(store, run.run_id, config):
        lm = models.load_model(
            None if run.model_id == models.DEFAULT_MODEL else run.model_id, device=args.device
        )
    result = report(store, lm, run.run_id, config, progress)
    bar.close()
    print_report(result)
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


def print_report(r: dict) -> None:
    print(f"run {r['run_id']} ({r['model_id']})")
    sp = r["sparsity"]["indicators"]
    print("\nSparsity: share of neurons under 0.2 of the per-token max, per layer")
    for layer, (a, o) in enumerate(
        zip(sp["abs"]["share_below_0.2"], sp["output"]["share_below_0.2"], strict=True)
    ):
        print(f"  layer {layer:>2}  |a| {a:6.1%}   output {o:6.1%}")
    print("Loss when the lowest k% of neurons per token are zeroed (held-out prompts)")
    for i, k in enumerate(r["sparsity"]["ks"]):
        print(f"  k={k:>2}%  |a| {sp['abs']['loss'][i]:.4f}   output {sp['output']['loss'][i]:.4f}")
    f = r["functionality"]
    print("\nFunctionality scores (AP) per layer, mean over categories: real / shuffled labels")
    print(f"  {'layer':>5}  {'best':>13}  {'top 0.5%':>13}  {'mean':>13}")
    for layer in range(len(f["real"]["best"][0])):
        cells = []
        for stat in ("best", "top_0.5pct", "mean"):
            real, shuffled = (np.mean([row[layer] for row in f[k][stat]]) for k in ("real", "shuffled"))
            cells.append(f"{real:.3f} / {shuffled:.3f}")
        print(f"  {layer:>5}  " + "  ".join(f"{c:>13}" for c in cells))
    for name in ("ablation_matrix", "ablation_matrix_no_resident"):
        _print_ablation(name, r[name])
    o = r["overlap"]
    pct = r["config"]["percent"]
    print(f"\nOverlap of the top-{pct:g}% sets ({o['measure']}; random {o['random_expectation']})")
    _print_matrix(o["categories"], o["categories"], o["matrix"], "{:.3f}")
    rc = r["recombination"]
    print(f"\nRecombination: keep only the top neurons of {' + '.join(rc['kept'])}; loss per category")
    names, values = ["baseline"], [rc["baseline_loss"]]
    for row in rc["rows"]:
        names += [f"top {row['percent']:g}% each ({row['share_kept']:.1%} kept)", "  random union, same size"]
        values += [row["loss"], row["random_loss"]]
    _print_matrix(names, rc["categories"], values, "{:.3f}")


def _print_ablation(name: str, a: dict) -> None:
    excluded = f", {a['excluded_resident']} resident neurons excluded" if a["excluded_resident"] else ""
    print(f"\nAblation matrix{excluded}: perplexity increase % (row: whose top-{a['neurons_per_category']} "
          f"neurons are zeroed; column: whose held-out prompts are measured)")  # fmt: skip
    print(f"  {a['split']}")
    _print_matrix(a["categories"] + ["random"], a["categories"], a["increase_pct"] + [a["random"]], "{:+.1f}")
    dominant = [c for c, d in zip(a["categories"], a["diagonal_dominant"], strict=True) if d]
    print(f"  diagonal dominates for {len(dominant)}/{len(a['categories'])}: {', '.join(dominant) or 'none'}")


def _print_matrix(rows: list[str], cols: list[str], values, fmt: str) -> None:
    width = max(8, *(len(c) for c in cols)) + 1
    label = max(len(r) for r in rows) + 2
    print(" " * label + "".join(f"{c[: width - 1]:>{width}}" for c in cols))
    for name, row in zip(rows, values, strict=True):
        print(f"{name:<{label}}" + "".join(f"{fmt.format(v):>{width}}" for v in row))
