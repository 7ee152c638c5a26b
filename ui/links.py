"""Links to a view: the run, neuron, brick, prompt and brick configuration of a page in the URL's query
string, and back. A configuration travels compressed (zlib, base64url) in the link, or, when that is
long, as a hash of a copy kept in the cache."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import streamlit as st

from core import configuration
from core.errors import BricklabError
from ui import config_state, resources
from ui.text import md

INLINE = 2000  # characters of an inline configuration; a longer one is kept in the cache, linked by hash
MAX_JSON = 4 * 2**20  # bytes a link's configuration may inflate to (a zip bomb stops here)
KIND = "link-config"  # cache entries holding linked configurations, keyed by their hash
_NEURON = re.compile(r"(\d{1,4}):(\d{1,7})")
_HASH = re.compile(r"[0-9a-f]{16}")
_ID = re.compile(r"[\w.:-]{1,128}")
SEEN = "link-seen"  # the query string this session already applied or wrote
PENDING = "link-pending"  # a linked configuration waiting for the page's run
KEPT = "link-kept"  # hashes of the configurations this session already put in the cache
METHOD = "brick-method"  # the Bricks page's method choice, set by a link to a brick
PAGE = "link-page"  # the URL path of the page running, set by ui.layout.page
_FIX = "Ask for the link again (copy it whole), or open the page without it."


@dataclass(frozen=True)
class View:
    """What a link restores; None where it says nothing."""

    run: str | None = None
    neuron: tuple[int, int] | None = None  # (layer, index)
    brick: str | None = None
    prompt: str | None = None
    config: str | None = None  # the configuration's JSON (inline links)
    config_hash: str | None = None  # the cache key of a configuration kept in the cache


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_config(text: str) -> str:
    """A configuration's JSON as URL-safe text: zlib, base64url without padding."""
    return base64.urlsafe_b64encode(zlib.compress(text.encode(), 9)).decode().rstrip("=")


def decode_config(value: str) -> str:
    """The JSON that `encode_config` wrote; a damaged value raises a BricklabError."""
    try:
        packed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_JSON + 1)
        if len(raw) > MAX_JSON or not inflater.eof:
            raise ValueError("too long or cut off")
        return raw.decode()
    except (ValueError, binascii.Error, zlib.error) as err:
        raise BricklabError(f"The link's configuration cannot be read ({err}).", _FIX) from None


def to_query(view: View) -> dict[str, str]:
    """The query parameters of a view (short names, only those set). A configuration longer than
    INLINE is linked by hash: the caller keeps it in the cache (see `config_hash`, KIND)."""
    query = {"run": view.run, "brick": view.brick, "prompt": view.prompt}
    if view.neuron is not None:
        query["neuron"] = f"{view.neuron[0]}:{view.neuron[1]}"
    if view.config is not None:
        packed = encode_config(view.config)
        query["cfg"] = packed if len(packed) <= INLINE else f"h{config_hash(view.config)}"
    return {k: v for k, v in query.items() if v is not None}


def parse(query: Mapping[str, str]) -> View:
    """The view a link's query parameters name; unknown parameters are ignored, a malformed one raises
    a BricklabError that names it."""
    run, brick = query.get("run"), query.get("brick")
    for name, value in (("run", run), ("brick", brick)):
        if value is not None and not _ID.fullmatch(value):
            raise BricklabError(f"The link's {name} '{value[:40]}' is not an id.", _FIX)
    neuron = None
    if "neuron" in query:
        match = _NEURON.fullmatch(query["neuron"])
        if not match:
            raise BricklabError(
                f"The link's neuron '{query['neuron'][:40]}' is not layer:index (e.g. 15:100).", _FIX
            )
        neuron = (int(match[1]), int(match[2]))
    config = digest = None
    if cfg := query.get("cfg"):
        if cfg.startswith("h") and _HASH.fullmatch(cfg[1:]):
            digest = cfg[1:]
        else:
            config = decode_config(cfg)
    prompt = query.get("prompt")
    return View(run, neuron, brick, prompt[:4000] if prompt else None, config, digest)


def url(view: View, page: str, here: str | None = None) -> str:
    """The link showing `view` on `page` (its URL path, "" for Home): the browser's address of the page
    (`here`, without its query) when known, else a link relative to the app's root."""
    query = to_query(view)
    tail = "?" + urlencode(query) if query else ""
    return (here.split("?")[0] if here else page or "./") + tail


def _key(query: Mapping[str, str]) -> str:
    return urlencode(sorted(query.items()))


def restore() -> None:
    """Apply the link this page was opened with, once per link: the run, neuron, brick and prompt go
    to the session's state, a configuration waits for the run (`apply_config`). A malformed link or an
    unknown run is a warning; the page shows what it would without the link."""
    query = st.query_params.to_dict()
    if not query or st.session_state.get(SEEN) == _key(query):
        return
    st.session_state[SEEN] = _key(query)
    try:
        view = parse(query)
    except BricklabError as exc:
        st.warning(md(exc))
        return
    if view.run:
        if all(r.run_id != view.run for r in resources.store().runs() if r.complete):
            st.warning(md(f"The link's run '{view.run}' is not in this cache: showing another run."))
        st.session_state["run_id"] = view.run
    if view.neuron:
        st.session_state["neuron"] = view.neuron
    if view.brick:
        st.session_state["brick"] = view.brick
        method = view.brick.split("-")[0]
        if method in ("coact", "functional", "map"):
            st.session_state[METHOD] = method
    if view.prompt:
        st.session_state["pg-prompt"] = view.prompt
    if view.config or view.config_hash:
        st.session_state[PENDING] = view


def apply_config(run) -> None:
    """Adopt the configuration of the link this page was opened with, checked against the run's model."""
    view = st.session_state.pop(PENDING, None)
    if view is None:
        return
    text = view.config
    if text is None:
        text = resources.store().get_json(run.run_id, KIND, {"hash": view.config_hash})
    if text is None:
        st.warning(
            "The link's configuration is kept in another cache (links to large configurations name "
            "it by hash): download it on the Export page there and upload it here."
        )
        return
    try:
        config_state.replace_with(run, configuration.loads(text, model=run))
    except BricklabError as exc:
        st.warning("The link's configuration was not applied: " + md(exc))


def share(page: str, view: View, label: str = "Link to this view") -> None:
    """Show the link to a view with a copy button, and put it in the address bar when the view is of
    the page running. `page` is the linked page's URL path ("Neuron_map"; "" for Home)."""
    if view.config is not None and len(encode_config(view.config)) > INLINE:
        digest, kept = config_hash(view.config), st.session_state.setdefault(KEPT, set())
        if digest not in kept:
            resources.store().put_json(view.run, KIND, {"hash": digest}, view.config)
            kept.add(digest)
    query = to_query(view)
    if page == st.session_state.get(PAGE) and st.query_params.to_dict() != query:
        st.query_params.from_dict(query)  # the address bar follows the view shown on this page
        st.session_state[SEEN] = _key(query)
    st.caption(f"{md(label)}: opening it shows this view (copy button at the right)")
    st.code(url(view, page, st.context.url), language=None, wrap_lines=True)
