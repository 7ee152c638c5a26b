"""Training an adapter brick with peft's LoRA on a copy of the model (the shared one is never touched),
the bundled invented-facts set, and fact recall: does the model answer the held-out questions?"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from core import models, prompts, settings
from core.errors import BricklabError
from core.live import adapters, compare
from core.progress import Progress

FACTS_PATH = settings.ROOT / "data" / "facts" / "invented_country.jsonl"
MAX_TEXTS = 2000


@dataclass(frozen=True)
class TrainConfig:
    layers: tuple[int, ...] | None = None  # None: every layer
    modules: tuple[str, ...] = adapters.MODULES  # which of gate, up, down get a LoRA pair
    rank: int = 8
    alpha: float = 16.0  # delta W = alpha / rank * B @ A, as in peft
    steps: int = 10  # 10 at 1e-2 taught the default model all 8 bundled facts (benchmarks/adapters.py)
    learning_rate: float = 1e-2
    batch_size: int = 32  # texts per step, taken in order and wrapped around
    max_tokens: int = 64  # longer texts are cut
    replay: int = 2  # default prompts per category whose next-token distribution the adapter must keep
    replay_weight: float = 1.0  # weight of that KL(base || adapted) term beside the texts' loss; 0: off
    seed: int = 0

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
            if not self.layers:
                raise BricklabError("No layers chosen for the adapter.", "Pick at least one layer.")
        modules = tuple(m for m in adapters.MODULES if m in self.modules)
        if not modules or len(modules) != len(set(self.modules)):
            raise BricklabError(f"Unknown modules {self.modules}.", f"Pick some of {adapters.MODULES}.")
        object.__setattr__(self, "modules", modules)
        for name, top in (("rank", 256), ("steps", 10_000), ("batch_size", 1024), ("max_tokens", 4096)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise BricklabError(f"{name} must be in 1..{top}.", f"Choose another {name}.")
        if not 0 < self.learning_rate < 1 or self.alpha <= 0:
            raise BricklabError("learning_rate must be in (0, 1) and alpha > 0.", "Fix the settings.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # plain JSON values, as stored in the adapter file


@dataclass(frozen=True)
class Facts:
    """Training texts and held-out (question, expected answer) pairs."""

    name: str
    texts: tuple[str, ...]
    questions: tuple[tuple[str, str], ...] = ()

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.texts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    sha256: str
    adapter: adapters.Adapter
    seconds: float
    losses: tuple[float, ...]  # training loss per step
    cached: bool  # found in the cache: nothing was trained


def load_facts(path: str | Path = FACTS_PATH) -> Facts:
    path = Path(path)
    return parse_facts(path.read_bytes(), path.name)


def parse_facts(data: bytes, filename: str) -> Facts:
    """A facts file (JSONL lines with kind "train" or "question") or any prompt file (every text trains)."""
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        records = [json.loads(line) for line in lines] if filename.endswith(".jsonl") else []
    except json.JSONDecodeError:
        records = []
    if records and all(isinstance(r, dict) and "kind" in r for r in records):
        texts = tuple(r["text"] for r in records if r["kind"] == "train")
        questions = tuple((r["text"], r["answer"]) for r in records if r["kind"] == "question")
    else:
        texts, questions = tuple(p.text for p in prompts.parse_prompts(data, filename).prompts), ()
    if not texts or len(texts) > MAX_TEXTS:
        raise BricklabError(f"'{filename}' has {len(texts)} training texts.", f"Give 1 to {MAX_TEXTS}.")
    return Facts(Path(filename).stem, texts, questions)


def find(fingerprint: str, facts: Facts, config: TrainConfig, directory=None) -> str | None:
    """The hash of a stored adapter trained from the same weights, texts and settings, if any."""
    for meta in adapters.catalog(directory, fingerprint):
        if meta.get("texts_hash") == facts.hash and meta.get("train") == config.to_dict():
            return meta["sha256"]
    return None


def train(
    lm: models.LoadedModel,
    facts: Facts,
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
    directory=None,
) -> Trained:
    """Train (or find in the cache) a LoRA adapter on `facts.texts` and store it; returns its hash."""
    hit = find(lm.info.fingerprint, facts, config, directory)
    if hit is not None:
        return Trained(hit, adapters.load(hit, lm.info, directory), 0.0, (), cached=True)
    layers = config.layers if config.layers is not None else tuple(range(lm.info.n_layers))
    if layers[-1] >= lm.info.n_layers:
        raise BricklabError(f"Layer {layers[-1]} does not exist.", f"Pick layers 0..{lm.info.n_layers - 1}.")
    for name in config.modules:
        adapters.projection(lm.model, 0, name)  # refuses unsupported layouts before any work
    started = time.perf_counter()
    weights, losses = _fit(lm, facts.texts, config, layers, progress)
    seconds = time.perf_counter() - started
    meta = {
        "model_id": lm.info.model_id, "fingerprint": lm.info.fingerprint, "name": facts.name,
        "layers": list(layers), "modules": list(config.modules), "rank": config.rank, "alpha": config.alpha,
        "train": config.to_dict(), "texts_hash": facts.hash, "n_texts": len(facts.texts),
        "seconds": round(seconds, 2), "final_loss": losses[-1], "created": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    sha = adapters.save(adapters.encode(weights, meta), directory)
    return Trained(sha, adapters.load(sha, lm.info, directory), seconds, tuple(losses), cached=False)


def _fit(lm, texts, config: TrainConfig, layers, progress) -> tuple[dict, list[float]]:
    from peft import LoraConfig, get_peft_model

    site = models.site_for(lm.model.config.model_type)
    paths = {"gate": site.gate, "up": site.up, "down": site.down}
    targets = [f"{site.layers}.{layer}.{paths[m]}" for layer in layers for m in config.modules]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=targets)
        base = adapters.copy_model(lm.model)
        anchor = _anchor(base, lm.tokenizer, config)
        model = get_peft_model(base, lora)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        batches = _batches(lm.tokenizer, texts, config, next(params.__iter__()).device)
        losses = []
        for step in range(config.steps):
            ids, mask, labels = batches[step % len(batches)]
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            drift = _drift(model, anchor) if anchor else torch.zeros(())
            (loss + config.replay_weight * drift).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if progress:
                progress(step + 1, config.steps, f"training, loss {losses[-1]:.3f}, drift {drift.item():.3f}")
    weights = {}
    for layer in layers:
        for m in config.modules:
            module = model.base_model.model.get_submodule(f"{site.layers}.{layer}.{paths[m]}")
            pair = module.lora_A["default"].weight, module.lora_B["default"].weight
            weights[(layer, m)] = tuple(t.detach().float().cpu().clone() for t in pair)
    return weights, losses


def replay_texts(tokenizer, per_category: int) -> list[str]:
    """The last `per_category` default prompts of each category (the app's and the benchmark's loss
    checks take the first ones), wrapped in the chat template as the model sees them in use."""
    by_category: dict = {}
    for p in prompts.default_prompt_set().prompts:
        by_category.setdefault(p.category, []).append(p.text)
    texts = [t for group in by_category.values() for t in group[-per_category:]] if per_category else []
    if not getattr(tokenizer, "chat_template", None):
        return texts
    chat = [[{"role": "user", "content": t}] for t in texts]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chat]


@torch.no_grad()
def _anchor(model, tokenizer, config: TrainConfig):
    """(ids, mask, the model's log-probabilities) on the replay texts, before training; None when off."""
    texts = replay_texts(tokenizer, config.replay)
    if not texts or config.replay_weight <= 0:
        return None
    ids, mask, _ = _batches(tokenizer, texts, replace(config, batch_size=len(texts)), model.device)[0]
    return ids, mask, torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)


def _drift(model, anchor) -> torch.Tensor:
    """Mean KL(base || adapted) of the next-token distributions over the replay texts' real tokens:
    it keeps what the adapter does to text that is not about the new facts small."""
    ids, mask, base = anchor
    adapted = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    kl = (base.exp() * (base - adapted)).sum(dim=-1)  # (batch, tokens)
    return (kl * mask).sum() / mask.sum()


def _batches(tokenizer, texts, config: TrainConfig, device) -> list[tuple[torch.Tensor, ...]]:
    """Texts in fixed batches; padding never counts. No EOS is appended: after plain sentences ending
    in EOS the chat model learned to end its turn at once (empty answers to the facts questions)."""
    out = []
    for b in range(0, len(texts), config.batch_size):
        chunk = list(texts[b : b + config.batch_size])
        enc = tokenizer(
            chunk,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=config.max_tokens,
            padding_side="right",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append((enc["input_ids"].to(device), enc["attention_mask"].to(device), labels.to(device)))
    return out


def recall(lm: models.LoadedModel, questions, active: adapters.Active = (), max_new_tokens: int = 24):
    """(share answered, [(question, answer, generated text, hit)]): a hit when the greedy answer to the
    question (chat template on) contains the expected answer, case-insensitive."""
    rows = []
    with adapters.applied(lm.model, active):
        for question, answer in questions:
            ids = compare.prompt_ids(lm, question)
            text = lm.tokenizer.decode(compare.generate(lm, ids, max_new_tokens), skip_special_tokens=True)
            rows.append((question, answer, text, answer.lower() in text.lower()))
    return sum(r[3] for r in rows) / max(len(rows), 1), rows


def default_facts() -> Facts:
    return load_facts(FACTS_PATH)
