"""Brick configurations: a versioned JSON document of bricks (sets of FFN neurons) and
what to do with each; validated loading and merge/diff (core.live.plan compiles one for the model)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from core import models
from core.errors import BricklabError

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MODES = ("off", "mean", "scale", "keep")
ADAPTER_MODES = ("on", "off", "scale")  # for adapter bricks (core.live.adapters)
MAX_BYTES = 50 * 2**20  # largest document loads() reads
MAX_DEPTH = 32  # nesting levels, e.g. inside `source`
ENTRY_FACTOR = 4  # cap on bricks + neuron entries, times n_layers * d_ff
SCHEMA = json.loads(Path(__file__).with_name("brick_config.schema.json").read_text())
_LIMITS = SCHEMA["properties"]["model"]["properties"]
MAX_FACTOR = SCHEMA["$defs"]["brick"]["properties"]["factor"]["maximum"]
# 2^17: one brick per neuron of the default model (46,080) with room to spare, or MoEfication's
# 32-neuron experts of any model up to 4M FFN neurons. Loading takes ~0.4 ms per brick on 2 cores,
# and a document loaded without its model may declare any shape up to 4096 x 2^20 neurons.
MAX_BRICKS = SCHEMA["properties"]["bricks"]["maxItems"]
Mode = Literal["off", "mean", "scale", "keep"]

# JSON Schema counts 3.0 as an integer; an index written as a float is a mistake.
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)
)
_VALIDATOR = validators.extend(Draft202012Validator, type_checker=_TYPES)(SCHEMA)
_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string"}
_TYPE_NAMES |= {"object": "an object", "array": "a list", "null": "null"}
_IDENT = re.compile(r"[A-Za-z_]\w*", re.ASCII)
_EXTRA = ("source", "note", "created", "operations")  # optional top-level fields, carried through
_FIX = "load the model it was made for, or export it again from this one"


class ConfigError(BricklabError, ValueError):
    """An invalid brick configuration; the message starts with the field's JSON path."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path or "document", problem
        super().__init__(f"{self.path}: {problem}")


def _short(value) -> str:
    """A value as an error message shows it: scalars only, truncated."""
    if isinstance(value, (dict, list)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)} items"
    if isinstance(value, int) and abs(value) > 10**18:
        return "a very large integer"
    scalar = value is None or isinstance(value, (bool, int, float, str))
    text = json.dumps(value) if scalar else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(*parts) -> str:
    """A JSON path like bricks[2].neurons["31"] (layer keys always in brackets)."""
    out = ""
    for before, part in zip((None, *parts), parts, strict=False):
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part) and before != "neurons":
            out += f".{part}" if out else part
        else:
            out += f"[{_short(part)}]"
    return out


def _index(value, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(where, f"{what} {_short(value)} is not an integer >= 0")
    return int(value)


def _neurons(neurons, where: str) -> dict[int, tuple[int, ...]]:
    if not isinstance(neurons, Mapping):
        raise ConfigError(where, f"expected {{layer: [...]}}, got {_short(neurons)}")
    out = {}
    for layer, indices in neurons.items():
        at = f'{where}["{_index(layer, where, "layer")}"]'
        if isinstance(indices, (str, bytes, Mapping)) or not np.iterable(indices):
            raise ConfigError(at, f"expected a list of indices, got {_short(indices)}")
        if values := sorted({_index(i, at, "neuron") for i in indices}):
            out[int(layer)] = tuple(values)
    if not out:
        raise ConfigError(where, "a brick needs at least one neuron; add some")
    return dict(sorted(out.items()))


def _factor(factor, mode: str) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)):
        raise ConfigError("factor", f"expected a number, got {_short(factor)}")
    if mode == "scale" and not 0 <= float(factor) <= MAX_FACTOR:  # False for NaN
        raise ConfigError("factor", f"{factor} is not in [0, {MAX_FACTOR:g}]; fix it")
    return float(factor) if mode == "scale" else 1.0


@dataclass(frozen=True)
class Brick:
    """A named set of FFN neurons and what to do with them; indices are deduplicated."""

    name: str  # unique within a configuration
    neurons: dict[int, tuple[int, ...]]  # layer -> sorted unique neuron indices
    mode: Mode  # off: zero; mean: run mean; scale: times factor; keep: keep only these
    factor: float = 1.0  # for mode "scale"; 1.0 for the other modes
    label: str | None = None  # e.g. the category it scores highest on

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("name", f"not a non-blank string: {_short(self.name)}")
        if self.label is not None and not isinstance(self.label, str):
            raise ConfigError("label", f"not a string or null: {_short(self.label)}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError("mode", f"unknown mode {_short(self.mode)}; use {MODES}")
        object.__setattr__(self, "factor", _factor(self.factor, self.mode))
        object.__setattr__(self, "neurons", _neurons(self.neurons, "neurons"))

    def to_dict(self) -> dict:
        out = {"name": self.name, "label": self.label, "mode": self.mode}
        out |= {"factor": self.factor} if self.mode == "scale" else {}
        return out | {"neurons": {str(k): list(v) for k, v in self.neurons.items()}}


@dataclass(frozen=True)
class AdapterRef:
    """A trained low-rank adapter brick (core.live.adapters), named by the sha256 of its safetensors file."""

    name: str  # unique among the configuration's bricks and adapters
    sha256: str  # 64 lowercase hex digits: the file adapters/<sha256>.safetensors
    layers: tuple[int, ...]  # layers it changes
    modules: tuple[str, ...]  # which of gate, up, down it changes
    rank: int
    mode: str = "on"  # on: added; off: not added; scale: added times factor
    factor: float = 1.0  # for mode "scale"; 1.0 for the other modes
    label: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("name", f"not a non-blank string: {_short(self.name)}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError("sha256", f"{_short(self.sha256)} is not 64 lowercase hex digits")
        if self.mode not in ADAPTER_MODES:
            raise ConfigError("mode", f"unknown mode {_short(self.mode)}; use {ADAPTER_MODES}")
        object.__setattr__(self, "factor", _factor(self.factor, self.mode))
        object.__setattr__(self, "layers", tuple(sorted({_index(x, "layers", "layer") for x in self.layers})))
        object.__setattr__(self, "modules", tuple(self.modules))

    def to_dict(self) -> dict:
        out = {"name": self.name, "label": self.label, "mode": self.mode}
        out |= {"factor": self.factor} if self.mode == "scale" else {}
        out |= {"sha256": self.sha256, "layers": list(self.layers), "modules": list(self.modules)}
        return out | {"rank": self.rank}


@dataclass(frozen=True)
class BrickConfig:
    """Bricks for one model, identified by its fingerprint and FFN shape."""

    model_id: str  # hub id or local folder; informative only
    fingerprint: str  # identity of the weights; must match where it is applied
    n_layers: int
    d_ff: int  # FFN neurons per layer
    bricks: tuple[Brick, ...]
    source: dict | None = None  # e.g. {"run_id": ..., "method": ...}; kept as is
    note: str | None = None
    created: str | None = None  # ISO 8601 timestamp
    operations: list | None = None  # brick operations that made the bricks (core.bricks.ops.Operation)
    adapters: tuple[AdapterRef, ...] = ()  # adapter bricks (core.live.adapters), referenced by file hash

    def __post_init__(self):
        self._check_fields()
        object.__setattr__(self, "bricks", tuple(self.bricks))
        for name in ("source", "operations"):  # a JSON round trip makes them plain and comparable
            if getattr(self, name) is not None:
                object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))
        seen = {}
        for i, brick in enumerate(self.bricks):
            if not isinstance(brick, Brick):
                raise ConfigError(_path("bricks", i), f"not a Brick: {_short(brick)}")
            if brick.name in seen:
                problem = f"name {_short(brick.name)} is also bricks[{seen[brick.name]}]"
                raise ConfigError(_path("bricks", i, "name"), f"{problem}; rename one")
            seen[brick.name] = i
            self._check_ranges(i, brick)
        self._check_adapters(seen)

    def _check_fields(self) -> None:
        for name, value in vars(self).items():
            kind, optional = {"source": dict, "operations": list}.get(name, str), name in _EXTRA
            if name in ("bricks", "n_layers", "d_ff", "adapters") or (optional and value is None):
                continue
            if not isinstance(value, kind) or not (value or optional):
                problem = f"expected a non-empty {kind.__name__}, got {_short(value)}"
                raise ConfigError(name, problem)
        for name in ("n_layers", "d_ff"):
            top = _LIMITS[name]["maximum"]
            if _index(getattr(self, name), name, name) not in range(1, top + 1):
                raise ConfigError(name, f"must be in 1..{top}; fix the model shape")

    def _check_ranges(self, i: int, brick: Brick) -> None:
        for layer, indices in brick.neurons.items():
            where, n, d = _path("bricks", i, "neurons", str(layer)), *self.shape
            if layer >= n:
                problem = f"layer {layer} is out of range for a model with {n} layers"
                raise ConfigError(where, f"{problem} (0-{n - 1}); {_FIX}")
            if indices[-1] >= d:
                problem = f"neuron {indices[-1]} is out of range for d_ff {d}"
                raise ConfigError(where, f"{problem} (0-{d - 1}); {_FIX}")

    def _check_adapters(self, names: dict) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        for i, ref in enumerate(self.adapters):
            if not isinstance(ref, AdapterRef):
                raise ConfigError(_path("adapters", i), f"not an AdapterRef: {_short(ref)}")
            if ref.name in names or any(r.name == ref.name for r in self.adapters[:i]):
                problem = f"{_short(ref.name)} is used twice (bricks and adapters share names)"
                raise ConfigError(_path("adapters", i, "name"), f"{problem}; rename one")
            if ref.layers and ref.layers[-1] >= self.n_layers:
                problem = f"layer {ref.layers[-1]} is out of range for a model with {self.n_layers} layers"
                raise ConfigError(_path("adapters", i, "layers"), f"{problem}; {_FIX}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_layers, self.d_ff

    def to_dict(self) -> dict:
        model = {"id": self.model_id, "fingerprint": self.fingerprint}
        model |= {"n_layers": self.n_layers, "d_ff": self.d_ff}
        out = {"schema_version": SCHEMA_VERSION, "model": model}
        out["bricks"] = [brick.to_dict() for brick in self.bricks]
        extra = {k: getattr(self, k) for k in _EXTRA}
        out |= {"adapters": [a.to_dict() for a in self.adapters]} if self.adapters else {}
        return out | {k: json.loads(json.dumps(v)) for k, v in extra.items() if v is not None}

    def to_json(self) -> str:
        """Stable text: fixed key order, layers and indices ascending, indent 2."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, doc, model=None) -> BrickConfig:
        """Validate a parsed document (and its match with `model`, if given)."""
        if not isinstance(doc, dict):
            problem = f"expected a JSON object, got {_short(doc)}"
            raise ConfigError("", f"{problem}; is this a brick configuration?")
        _check_version(doc)
        _check_entries(doc, model)  # first of the checks that walk every brick: the cheapest
        _check_values(doc)
        error = best_match(islice(_VALIDATOR.iter_errors(_skeleton(doc)), 100))
        if error is not None:
            raise _schema_error(error)
        if model is not None:
            check_model(doc["model"], model)
        bricks = tuple(_brick(i, b) for i, b in enumerate(doc["bricks"]))
        m, extra = doc["model"], [doc.get(k) for k in _EXTRA]
        adapters = tuple(_adapter(i, a) for i, a in enumerate(doc.get("adapters", [])))
        return cls(m["id"], m["fingerprint"], m["n_layers"], m["d_ff"], bricks, *extra, adapters=adapters)


def _brick(i: int, doc: dict) -> Brick:
    for key in doc["neurons"]:
        if key != str(int(key)):  # the schema's regex lets "3\n" through
            raise ConfigError(_path("bricks", i, "neurons", key), 'write it like "3"')
    neurons = {int(k): v for k, v in doc["neurons"].items()}
    args = doc["name"], neurons, doc["mode"], doc.get("factor", 1.0), doc.get("label")
    try:
        return Brick(*args)
    except ConfigError as err:
        raise ConfigError(f"{_path('bricks', i)}.{err.path}", err.problem) from None


def _adapter(i: int, doc: dict) -> AdapterRef:
    keys = ("name", "sha256", "layers", "modules", "rank", "mode")
    try:
        return AdapterRef(*(doc[k] for k in keys), doc.get("factor", 1.0), doc.get("label"))
    except ConfigError as err:
        raise ConfigError(f"{_path('adapters', i)}.{err.path}", err.problem) from None


class _Duplicated(dict):
    """A parsed JSON object in which `key` appeared more than once."""

    key = ""


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen, out = set(), _Duplicated(out)
        out.key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return out


def _check_values(doc: dict) -> None:
    """Reject repeated keys and NaN/Infinity (Python's json accepts both) and deep nesting
    (which would exhaust the recursion limit later, e.g. in json.dumps)."""
    stack = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Duplicated):
            raise ConfigError(_path(*path, value.key), "key given twice; keep one")
        if len(path) > MAX_DEPTH:
            raise ConfigError(_path(*path), f"nested over {MAX_DEPTH} deep; flatten it")
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(item, (dict, list)):
                stack.append((item, (*path, key)))
            elif isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(_path(*path, key), f"{item} is not a finite number; fix it")


def _check_version(doc: dict) -> None:
    version = doc.get("schema_version")
    if "schema_version" not in doc:
        raise ConfigError("schema_version", f"missing; add it (now {SCHEMA_VERSION})")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        problem = f"{_short(version)} is not one of the versions this bricklab reads"
        problem += f" ({', '.join(map(str, SUPPORTED_VERSIONS))})"
        raise ConfigError("schema_version", f"{problem}; upgrade bricklab")


def _check_entries(doc: dict, model) -> None:
    """Refuse huge documents right after decoding, before anything validates brick by brick: past
    MAX_BRICKS bricks, or more bricks and neuron entries than ENTRY_FACTOR x the model's neurons."""
    bricks = doc.get("bricks")
    if type(bricks) is list and len(bricks) > MAX_BRICKS:
        problem = f"{len(bricks):,} bricks, over the limit of {MAX_BRICKS:,}"
        raise ConfigError("bricks", f"{problem}; merge small bricks or split the configuration")
    keys = ("n_layers", "d_ff")
    shape = doc.get("model") if model is None else {k: getattr(model, k) for k in keys}
    layers, d_ff = (shape.get(k) if isinstance(shape, dict) else 0 for k in keys)
    if type(layers) is not int or type(d_ff) is not int or type(bricks) is not list or min(layers, d_ff) < 1:
        return
    neurons = [b.get("neurons") for b in bricks if isinstance(b, dict)]
    lists = [v for n in neurons if isinstance(n, dict) for v in n.values()]
    count = len(bricks) + sum(len(v) for v in lists if isinstance(v, list))
    if count > ENTRY_FACTOR * layers * d_ff:
        problem = f"{count} bricks and entries, over {ENTRY_FACTOR} x n_layers x d_ff"
        raise ConfigError("bricks", f"{problem}; list each neuron once per brick")


def _skeleton(doc: dict) -> dict:
    """doc with each list of plain indices >= 0 cut to one: the schema's verdict on it,
    reached in one pass (jsonschema spends ~8 us per item, 0.4 s per 46k neurons)."""
    if type(doc.get("bricks")) is not list:
        return doc
    return doc | {"bricks": [_cut(brick) for brick in doc["bricks"]]}


def _cut(brick):
    neurons = brick.get("neurons") if isinstance(brick, dict) else None
    if not isinstance(neurons, dict):
        return brick
    plain = {k for k, v in neurons.items() if type(v) is list and all(type(i) is int and i >= 0 for i in v)}
    return brick | {"neurons": {k: v[:1] if k in plain else v for k, v in neurons.items()}}


def _schema_error(error) -> ConfigError:
    path, value, rule = list(error.absolute_path), error.instance, error.validator_value
    schema = error.schema if isinstance(error.schema, dict) else {}
    custom, known = schema.get("errorMessage"), schema.get("properties", {})
    if error.validator == "required":
        missing = next(k for k in rule if k not in value)
        return ConfigError(_path(*path, missing), custom or "required; add it")
    if error.validator == "additionalProperties":
        extra = next(k for k in value if k not in known)
        return ConfigError(_path(*path, extra), f"unknown field; use {', '.join(known)}")
    if "propertyNames" in error.relative_schema_path:
        return ConfigError(_path(*path, value), custom or "invalid key; rename it")
    if error.validator == "type":
        want = " or ".join(_TYPE_NAMES[t] for t in np.atleast_1d(rule))
        return ConfigError(_path(*path), f"expected {want}, got {_short(value)}; fix it")
    generic = {"minimum": f"must be >= {rule}", "maximum": f"must be <= {rule}"}
    problem = custom or generic.get(error.validator, f"breaks {error.validator!r}")
    return ConfigError(_path(*path), f"{problem} (got {_short(value)})")


def check_model(config, model) -> None:
    """Refuse a configuration (a BrickConfig, or a file's "model" entry) made for another model than
    `model` (a core.models.ModelInfo): a ConfigError at model.<the field that differs>."""
    if (found := models.mismatch(config, model, "this configuration")) is not None:
        field, problem = found
        raise ConfigError(_path("model", field), f"{problem}; {_FIX}")


def loads(text: str | bytes, model=None) -> BrickConfig:
    """Parse and validate a brick configuration; every problem raises ConfigError."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ConfigError("", f"expected str or bytes, got {type(text).__name__}")
    if len(text) > MAX_BYTES:
        raise ConfigError("", f"larger than {MAX_BYTES} bytes; split or trim it")
    try:
        doc = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ConfigError("", f"invalid JSON at {where}: {err.msg}; fix it") from None
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8 text; save it as UTF-8 JSON") from None
    except (ValueError, RecursionError) as err:  # digit limit, deep nesting
        raise ConfigError("", f"unreadable JSON ({err}); export it again") from None
    return BrickConfig.from_dict(doc, model)


def load(path: str | Path, model=None) -> BrickConfig:
    """Read and validate a brick configuration file (see loads)."""
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError("", f"cannot read {path}: {err}; check the path") from None
    return loads(text, model)


def merge(a: BrickConfig, b: BrickConfig) -> BrickConfig:
    """a's bricks, then b's new ones; on a name clash b's brick replaces a's in place.
    source, note and created come from b where set, else from a."""
    if (found := models.mismatch(b, a, "the second configuration")) is not None:
        raise ConfigError("model", f"cannot merge configurations of different models: {found[1]}")
    theirs = {brick.name: brick for brick in b.bricks}
    bricks = [theirs.pop(brick.name, brick) for brick in a.bricks]
    extra = {k: getattr(b if getattr(b, k) is not None else a, k) for k in _EXTRA}
    new = {ref.name: ref for ref in b.adapters}
    adapters = (*(new.pop(ref.name, ref) for ref in a.adapters), *new.values())
    return replace(a, bricks=(*bricks, *theirs.values()), adapters=adapters, **extra)


def diff(a: BrickConfig, b: BrickConfig) -> dict:
    """What turns a into b: {"added": [names], "removed": [names], "changed": {name:
    {"mode"/"factor"/"label": {"from", "to"}, "neurons": {"added"/"removed": {layer:
    [indices]}}}}, listing only what differs."""
    old, new = {x.name: x for x in a.bricks}, {x.name: x for x in b.bricks}
    changed = {name: _brick_diff(old[name], new[name]) for name in old if name in new}
    return {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": {name: change for name, change in changed.items() if change},
    }


def _brick_diff(x: Brick, y: Brick) -> dict:
    out = {}
    for field in ("mode", "factor", "label"):
        if getattr(x, field) != getattr(y, field):
            out[field] = {"from": getattr(x, field), "to": getattr(y, field)}
    neurons = {"added": _minus(y, x), "removed": _minus(x, y)}
    return out | ({"neurons": neurons} if any(neurons.values()) else {})


def _minus(p: Brick, q: Brick) -> dict[int, list[int]]:
    less = {k: sorted(set(v) - set(q.neurons.get(k, ()))) for k, v in p.neurons.items()}
    return {layer: indices for layer, indices in less.items() if indices}


def problems(text: str | bytes, model=None, limit: int = 20) -> list[ConfigError]:
    """Every problem of a configuration, field by field (at most `limit`); [] when it loads.

    A document-level problem (not JSON, wrong version, too large) comes alone: nothing past it can
    be checked. Otherwise schema errors are listed together, then each brick is checked on its own."""
    try:
        loads(text, model)
        return []
    except ConfigError as first:
        found = [first]
    try:
        doc = json.loads(text, object_pairs_hook=_object)
        if not isinstance(doc, dict):
            return found
        _check_version(doc)
        _check_entries(doc, model)
        _check_values(doc)
    except (ConfigError, ValueError, RecursionError):
        return found
    found += [_schema_error(e) for e in islice(_VALIDATOR.iter_errors(_skeleton(doc)), limit)]
    if len(found) == 1:  # the schema holds: check the model and each brick alone
        found += _brick_problems(doc, model)
    unique = {str(e): e for e in found}
    return list(unique.values())[:limit]


def _brick_problems(doc: dict, model) -> list[ConfigError]:
    out, names = [], {}
    for i, brick in enumerate(doc["bricks"]):
        try:
            BrickConfig.from_dict(doc | {"bricks": [brick]}, model)
        except ConfigError as err:
            path = err.path.replace("bricks[0]", f"bricks[{i}]", 1)
            out.append(ConfigError(path, err.problem))
        if brick["name"] in names:
            problem = f"name {_short(brick['name'])} is also bricks[{names[brick['name']]}]; rename one"
            out.append(ConfigError(_path("bricks", i, "name"), problem))
        names.setdefault(brick["name"], i)
    return out
