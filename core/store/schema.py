"""The cache's tables as one constant, the run record read back from them, and which tables a run owns."""

from __future__ import annotations

import json
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,   -- hash of (fingerprint, prompt hash, capture settings)
    model_id VARCHAR, model_type VARCHAR, fingerprint VARCHAR,
    prompt_set VARCHAR, prompt_hash VARCHAR, settings VARCHAR,
    n_layers INTEGER, d_ff INTEGER, n_prompts INTEGER, n_chunks INTEGER,
    categories VARCHAR,           -- JSON list, in label order
    status VARCHAR,               -- 'incomplete' until finalised, then 'complete'
    n_tokens BIGINT, seconds DOUBLE, created TIMESTAMP DEFAULT current_timestamp, finished TIMESTAMP
);
CREATE TABLE IF NOT EXISTS prompts (
    run_id VARCHAR, prompt_idx INTEGER, prompt_id VARCHAR, category VARCHAR, text VARCHAR
);
CREATE TABLE IF NOT EXISTS chunks (run_id VARCHAR, chunk INTEGER, n_tokens BIGINT, seconds DOUBLE);
CREATE TABLE IF NOT EXISTS tokens (   -- the prompt's own tokens (chat-template tokens excluded)
    run_id VARCHAR, prompt_idx INTEGER, pos INTEGER, token_id INTEGER, token VARCHAR,
    truncated BOOLEAN
);
CREATE TABLE IF NOT EXISTS prompt_acts (  -- float16 (d_ff,): mean |a| over the prompt's tokens
    run_id VARCHAR, prompt_idx INTEGER, layer INTEGER, mean_abs BLOB
);
CREATE TABLE IF NOT EXISTS firing (       -- uint64 (n_tokens, ceil(d_ff/64)): neurons that fire
    run_id VARCHAR, prompt_idx INTEGER, layer INTEGER, bits BLOB
);
CREATE TABLE IF NOT EXISTS chunk_arrays ( -- per-chunk partial reductions, summed when finalised
    run_id VARCHAR, chunk INTEGER, layer INTEGER, name VARCHAR, data BLOB
);
CREATE TABLE IF NOT EXISTS top_state (    -- top examples merged over the committed chunks, replaced with
    run_id VARCHAR, layer INTEGER, name VARCHAR, data BLOB  -- each chunk; gone when finalised
);
CREATE TABLE IF NOT EXISTS layer_arrays ( -- final per-layer arrays: histograms, neuron means
    run_id VARCHAR, layer INTEGER, name VARCHAR, data BLOB
);
CREATE TABLE IF NOT EXISTS top_examples (
    run_id VARCHAR, layer INTEGER, neuron INTEGER, rank INTEGER,
    prompt_idx INTEGER, pos INTEGER, value REAL
);
CREATE TABLE IF NOT EXISTS arrays (      -- catalog of bulk arrays in files beside the cache (store.arrays)
    run_id VARCHAR, name VARCHAR, layer INTEGER, file VARCHAR, dtype VARCHAR, shape VARCHAR, bytes BIGINT,
    chunks INTEGER[]                    -- the chunks whose tokens the arrays sum over
);
CREATE TABLE IF NOT EXISTS chunk_files ( -- catalog of a chunk's arrays in files beside the cache: the
    run_id VARCHAR, chunk INTEGER, name VARCHAR, file VARCHAR,  -- prompt_acts of a run whose sample is
    first_prompt INTEGER, dtype VARCHAR, shape VARCHAR, bytes BIGINT  -- partial (store.arrays)
);
CREATE TABLE IF NOT EXISTS results (      -- cached derived results (bricks, maps, reports)
    run_id VARCHAR, kind VARCHAR, params VARCHAR, created TIMESTAMP DEFAULT current_timestamp,
    payload BLOB
);
"""

RUN_TABLES = (
    "prompts",
    "chunks",
    "tokens",
    "prompt_acts",
    "firing",
    "chunk_arrays",
    "top_state",
    "layer_arrays",
    "top_examples",
    "arrays",
    "chunk_files",
    "results",
)

# The tables a committed chunk writes rows to: what a shard hands over to be merged, row for row; and
# with them `chunk_files`, the catalog of its files, which a shard hands over with the files' bytes
# (missing from files of an older bricklab, whose chunks wrote prompt_acts rows instead).
CHUNK_ROW_TABLES = ("chunks", "prompt_acts", "firing", "tokens", "chunk_arrays")
CHUNK_TABLES = (*CHUNK_ROW_TABLES, "chunk_files")
# The `chunk_arrays` and `top_state` names of top examples: (k, d_ff) value, prompt and position.
TOP_ARRAYS = ("top_val", "top_prompt", "top_pos")
# The `arrays` names of a run whose token sample is partial: int32 (d_ff, d_ff) co-activation counts per
# layer over half A and half B of the prompts (`prompts.halves` of COACT_SEED; core.capture.counts).
COACT_ARRAYS = ("coact_a", "coact_b")
COACT_SEED = 0


@dataclass(frozen=True)
class Run:
    run_id: str
    model_id: str
    model_type: str
    fingerprint: str
    prompt_set: str
    prompt_hash: str
    settings: dict
    n_layers: int
    d_ff: int
    n_prompts: int
    n_chunks: int
    categories: list[str]
    status: str
    n_tokens: int | None
    seconds: float | None
    created: object
    finished: object

    @property
    def complete(self) -> bool:
        return self.status == "complete"


RUN_COLUMNS = ", ".join(Run.__dataclass_fields__)
# The status `Store.runs()` gives a complete run whose rows no longer read back from the file.
DAMAGED = "damaged"


def to_run(row) -> Run:
    """A `runs` row, selected as RUN_COLUMNS, with its JSON columns decoded."""
    values = dict(zip(Run.__dataclass_fields__, row, strict=True))
    values["settings"] = json.loads(values["settings"])
    values["categories"] = json.loads(values["categories"])
    return Run(**values)
