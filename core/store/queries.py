"""The store's queries about single neurons and tokens: a neuron's statistics and top examples with
their prompts, prompts' tokens, the neurons whose top examples read a given token, every token of a
run in firing order, where a token occurs, and the token sample whose firing bits bricks read.
"""

from __future__ import annotations

import numpy as np

from core.store import faults, sample

# A stored token as plain lower-case text: the byte-level BPE (Ġ, Ċ) and SentencePiece (▁) space
# and newline markers read as spaces, then trimmed.
_PLAIN_TOKEN = "lower(trim(replace(replace(replace(t.token, 'Ġ', ' '), '▁', ' '), 'Ċ', ' ')))"


class NeuronQueries:
    """Mixin of `Store`: look-ups behind the neuron, search and brick pages."""

    @faults.guarded
    def neuron_stats(self, run_id: str, layer: int, neuron: int) -> dict[str, float]:
        """The neuron's 'mean_abs', 'mean_act' and 'fire_rate' (those the run has)."""
        sql = (
            "SELECT name, data FROM layer_arrays WHERE run_id = ? AND layer = ? "
            "AND name IN ('mean_abs', 'mean_act', 'fire_rate')"
        )
        rows = self.cursor().execute(sql, [run_id, layer]).fetchall()
        return {name: float(np.frombuffer(data, np.float32)[neuron]) for name, data in rows}

    @faults.guarded
    def neuron_examples(self, run_id: str, layer: int, neuron: int) -> list[tuple]:
        """The neuron's top examples, best first: (rank, prompt_idx, prompt_id, category, pos, value)."""
        sql = (
            "SELECT e.rank, e.prompt_idx, p.prompt_id, p.category, e.pos, e.value FROM top_examples e "
            "JOIN prompts p ON p.run_id = e.run_id AND p.prompt_idx = e.prompt_idx "
            "WHERE e.run_id = ? AND e.layer = ? AND e.neuron = ? ORDER BY e.rank"
        )
        return self.cursor().execute(sql, [run_id, layer, neuron]).fetchall()

    @faults.guarded
    def prompt_text(self, run_id: str, prompt_idx: int) -> str | None:
        sql = "SELECT text FROM prompts WHERE run_id = ? AND prompt_idx = ?"
        row = self.cursor().execute(sql, [run_id, prompt_idx]).fetchone()
        return row[0] if row else None

    @faults.guarded
    def prompt_tokens(self, run_id: str, prompt_idxs: list[int]) -> dict[int, list[str]]:
        """The stored tokens of each of the prompts, in position order (prompts without tokens left out)."""
        if not prompt_idxs:
            return {}
        sql = (
            "SELECT prompt_idx, token FROM tokens WHERE run_id = ? AND prompt_idx IN "
            f"({', '.join('?' * len(prompt_idxs))}) ORDER BY prompt_idx, pos"
        )
        out: dict[int, list[str]] = {}
        for idx, token in self.cursor().execute(sql, [run_id, *prompt_idxs]).fetchall():
            out.setdefault(idx, []).append(token)
        return out

    @faults.guarded
    def search_tokens(self, run_id: str, needle: str, exact: bool, limit: int) -> list[tuple]:
        """Neurons whose top examples land on tokens reading `needle` (lower case; exact=False: tokens
        containing it), most hits first: (layer, neuron, hits, prompts, best value)."""
        if exact:
            match, value = f"{_PLAIN_TOKEN} = ?", needle
        else:
            escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            match, value = f"{_PLAIN_TOKEN} LIKE ? ESCAPE '\\'", f"%{escaped}%"
        sql = (
            "WITH hit AS (SELECT prompt_idx, pos FROM tokens t WHERE t.run_id = ? AND " + match + ") "
            "SELECT e.layer, e.neuron, count(*) AS hits, count(DISTINCT e.prompt_idx) AS prompts, "
            "max(e.value) AS best FROM top_examples e "
            "JOIN hit h ON h.prompt_idx = e.prompt_idx AND h.pos = e.pos WHERE e.run_id = ? "
            "GROUP BY e.layer, e.neuron ORDER BY hits DESC, best DESC, e.layer, e.neuron LIMIT ?"
        )
        return self.cursor().execute(sql, [run_id, value, run_id, int(limit)]).fetchall()

    @faults.guarded
    def run_tokens(self, run_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt_idx int32, token_id int32, token text) of every token of the run, in the order of
        `firing_bits` rows."""
        sql = "SELECT prompt_idx, token_id, token FROM tokens WHERE run_id = ? ORDER BY prompt_idx, pos"
        got = self.cursor().execute(sql, [run_id]).fetchnumpy()
        idx, ids = (np.asarray(got[k], np.int32) for k in ("prompt_idx", "token_id"))
        return idx, ids, np.asarray(got["token"], object)

    @faults.guarded
    def token_positions(self, run_id: str, needle: str, max_prompts: int) -> dict[int, list[int]]:
        """Where tokens reading `needle` (lower case, as `search_tokens` matches) occur: prompt_idx ->
        positions among its own tokens, for the first `max_prompts` prompts that hold one."""
        sql = (
            "WITH hit AS (SELECT prompt_idx, pos FROM tokens t WHERE t.run_id = ? AND "
            f"{_PLAIN_TOKEN} = ?), first AS (SELECT DISTINCT prompt_idx FROM hit "
            "ORDER BY prompt_idx LIMIT ?) "
            "SELECT h.prompt_idx, h.pos FROM hit h JOIN first USING (prompt_idx) ORDER BY h.prompt_idx, h.pos"
        )
        out: dict[int, list[int]] = {}
        for idx, pos in self.cursor().execute(sql, [run_id, needle, int(max_prompts)]).fetchall():
            out.setdefault(idx, []).append(pos)
        return out

    # the token sample: the tokens whose firing bits are kept (issue #16, core.store.sample). A run of
    # format 2 kept every token's; core.bricks.firing is the one reader.

    def sample_rate(self, run_id: str) -> float:
        """The share of the run's tokens whose firing bits it keeps (1: every token)."""
        run = self.require_run(run_id)
        budget = run.settings.get("sample_bytes")  # absent in format 2: every token was kept
        return sample.sample_rate(budget, run.n_tokens or 0, run.n_layers, run.d_ff)

    def count_rate(self, run_id: str) -> float:
        """The share of the run's tokens its co-activation counts sum over (when its sample is partial)."""
        run = self.require_run(run_id)
        if "count_tokens" in run.settings:
            return sample.count_rate(
                run.settings["count_tokens"], run.n_tokens or 0, self.sample_rate(run_id)
            )
        return run.settings.get("count_rate", 1.0)  # the first format-3 runs stored the share itself

    def sample_complete(self, run_id: str) -> bool:
        """Whether the run's token sample holds every token."""
        return self.sample_rate(run_id) >= 1.0

    @faults.guarded
    def token_places(self, run_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_idx int32, pos int32) of every token of the run, in (prompt, position) order."""
        sql = "SELECT prompt_idx, pos FROM tokens WHERE run_id = ? ORDER BY prompt_idx, pos"
        got = self.cursor().execute(sql, [run_id]).fetchnumpy()
        return np.asarray(got["prompt_idx"], np.int32), np.asarray(got["pos"], np.int32)

    def sample_rows(self, run_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_idx int32, pos int32) of each token in the sample, in the order of `firing_sample` rows."""
        prompt, pos = self.token_places(run_id)
        kept = sample.in_sample(prompt, pos, self.sample_rate(run_id))
        return prompt[kept], pos[kept]

    def firing_sample(self, run_id: str, layer: int) -> np.ndarray:
        """Packed firing bits of one layer over the sample's tokens: uint64 (n_sample, words), rows in
        `sample_rows` order (the `firing` table holds the sampled tokens only)."""
        return self.firing_bits(run_id, layer)
