"""The store's queries about single neurons and tokens: a neuron's statistics and top examples with
their prompts, prompts' tokens, the neurons whose top examples read a given token, and the tokens
most particular to groups of neurons.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.store import faults

# A token counts for a group when the group holds much of the neurons that have it among their top
# examples; the +10 keeps rare tokens (and "the") from topping the lists.
_TOKEN_SCORE = "n / (n_all + 10.0)"
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
    def group_tokens(
        self, run_id: str, group: np.ndarray, layer: np.ndarray, neuron: np.ndarray, n: int
    ) -> list[tuple[int, str]]:
        """Per group, the n tokens most particular to its members' top examples, as (group, token)
        rows, best first within a group. Member i is (layer[i], neuron[i]) of group[i]."""
        members = pa.table(
            {
                "grp": np.asarray(group, np.int32),
                "layer": np.asarray(layer, np.int32),
                "neuron": np.asarray(neuron, np.int32),
            }
        )
        sql = f"""
            WITH ex AS (
                SELECT e.layer, e.neuron, t.token FROM top_examples e
                JOIN tokens t ON t.run_id = e.run_id AND t.prompt_idx = e.prompt_idx AND t.pos = e.pos
                WHERE e.run_id = ?
            ),
            everywhere AS (SELECT token, count(DISTINCT (layer, neuron)) AS n_all FROM ex GROUP BY token),
            mine AS (
                SELECT m.grp, ex.token, count(DISTINCT (ex.layer, ex.neuron)) AS n
                FROM ex JOIN _members m ON ex.layer = m.layer AND ex.neuron = m.neuron
                GROUP BY m.grp, ex.token
            )
            SELECT grp, token FROM mine JOIN everywhere USING (token)
            QUALIFY row_number() OVER (PARTITION BY grp ORDER BY {_TOKEN_SCORE} DESC, token) <= ?
            ORDER BY grp, {_TOKEN_SCORE} DESC, token
        """
        cur = self.cursor()
        cur.register("_members", members)
        try:
            return cur.execute(sql, [run_id, n]).fetchall()
        finally:
            cur.unregister("_members")
            cur.close()
