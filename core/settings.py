"""Where bricklab keeps its files; environment variables move them (BRICKLAB_DATA, BRICKLAB_DB)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("BRICKLAB_DATA", ROOT / "data"))


def db_path() -> Path:
    return Path(os.environ.get("BRICKLAB_DB", data_dir() / "bricklab.duckdb"))


def models_dir() -> Path:
    return data_dir() / "models"


def default_prompts_path() -> Path:
    return ROOT / "data" / "prompts" / "default.jsonl"
