"""Widgets for adapter bricks: the training form, the cached adapters, fact recall, the Playground
toggles and the zip bundle (configuration + adapter files)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import configuration, export
from core.configuration import AdapterRef
from core.errors import BricklabError
from core.live import adapter_train, adapters
from core.models import LoadedModel
from core.store import Run
from ui import config_state, layout, resources
from ui.text import md

FACTS = "adapter_facts"  # the session's training set (adapter_train.Facts)


def facts_picker() -> adapter_train.Facts:
    """The bundled invented facts, or a prompt file the person uploads (every text trains)."""
    upload = st.file_uploader("Your own texts (.jsonl, .csv or .txt); default: the bundled invented facts",
                              type=["jsonl", "csv", "txt"])  # fmt: skip
    try:
        facts = (
            adapter_train.parse_facts(upload.getvalue(), upload.name)
            if upload
            else adapter_train.default_facts()
        )
    except BricklabError as exc:
        resources.show_error(exc)
    st.session_state[FACTS] = facts
    st.caption(
        f"**{md(facts.name)}**: {len(facts.texts)} training texts, {len(facts.questions)} held-out questions"
    )
    with st.expander("Training texts"):
        st.write(pd.DataFrame({"text": facts.texts}))
    return facts


def train_form(run: Run, lm: LoadedModel, facts: adapter_train.Facts) -> None:
    """Layers, projections, rank and steps; Train shows a progress bar and stores the adapter."""
    a, b, c, d = st.columns([3, 2, 1, 1])
    layers = a.multiselect("Layers (none: all)", list(range(run.n_layers)), key="ad-layers")
    modules = b.multiselect(
        "Projections", list(adapters.MODULES), default=list(adapters.MODULES), key="ad-mod"
    )
    rank = c.number_input("Rank", 1, 64, 8, key="ad-rank")
    steps = d.number_input("Steps", 1, 500, adapter_train.TrainConfig.steps, key="ad-steps")
    if not st.button("Train adapter", type="primary", disabled=not modules):
        return
    try:
        settings = adapter_train.TrainConfig(layers or None, tuple(modules), int(rank), steps=int(steps))
        trained = adapter_train.train(lm, facts, settings, layout.progress_bar())
    except BricklabError as exc:
        resources.show_error(exc)
    where = "found in the cache" if trained.cached else f"trained in {trained.seconds:.1f} s"
    st.success(f"Adapter {trained.sha256[:12]}… {where}: {trained.adapter.n_params:,} parameters.")


def catalog(run: Run) -> None:
    """The cached adapters of this model; one can join the session's configuration."""
    stored = adapters.catalog(fingerprint=run.fingerprint)
    if not stored:
        st.info("No adapter for this model yet: train one above.")
        return
    table = pd.DataFrame(
        [{"sha256": m["sha256"][:12], "texts": m.get("name"), "layers": len(m["layers"]),
          "modules": ", ".join(m["modules"]), "rank": m["rank"], "MB": round(m["bytes"] / 1e6, 2),
          "train s": m.get("seconds"), "final loss": m.get("final_loss")} for m in stored]
    )  # fmt: skip
    st.dataframe(table, hide_index=True)
    picked = st.selectbox("Adapter", range(len(stored)), format_func=lambda i: table["sha256"][i])
    meta = stored[picked]
    name = f"adapter-{meta['sha256'][:8]}"
    chosen = name in config_state.adapters(run)
    if st.button("Add to the configuration", disabled=chosen):
        ref = AdapterRef(
            name, meta["sha256"], meta["layers"], meta["modules"], meta["rank"], label=meta.get("name")
        )
        config_state.set_adapter(run, ref)
        st.rerun()
    if chosen:
        st.caption(f"**{md(name)}** is in this session's configuration: toggle it on the Playground.")


def recall(lm: LoadedModel, facts: adapter_train.Facts, run: Run) -> None:
    """Ask the held-out questions with the session's adapters on, and with them off."""
    refs = [r for r in config_state.adapters(run).values() if r.mode != "off"]
    if not facts.questions or not refs or not st.button("Ask the held-out questions (adapters on vs off)"):
        return
    try:
        active = [(adapters.load(r.sha256, lm.info), r.factor) for r in refs]
    except BricklabError as exc:
        resources.show_error(exc)
    with st.spinner("Generating answers…"):
        share_on, on = adapter_train.recall(lm, facts.questions, active)
        share_off, off = adapter_train.recall(lm, facts.questions)
    c = st.columns(2)
    c[0].metric("recall, adapters on", f"{share_on:.0%}")
    c[1].metric("recall, adapters off", f"{share_off:.0%}")
    rows = [
        {"question": q, "expected": answer, "adapters on": text, "adapters off": plain[2]}
        for (q, answer, text, _), plain in zip(on, off, strict=True)
    ]
    st.table(pd.DataFrame(rows), hide_index=True)  # wraps long answers; a dataframe cut the last column


def toggles(run: Run) -> None:
    """One row per adapter brick of the session: on, off or scale (Playground)."""
    for name, ref in list(config_state.adapters(run).items()):
        a, b, c = st.columns([2, 3, 2], vertical_alignment="center")
        label = f"{md(ref.label or 'trained')} · {len(ref.layers)} layers · rank {ref.rank}"
        a.markdown(f"**{md(name)}** (adapter)  \n{label}")
        mode = b.segmented_control(md(name), configuration.ADAPTER_MODES, default=ref.mode,
                                   key=f"admode-{name}", label_visibility="collapsed")  # fmt: skip
        factor = c.slider(
            "factor", 0.0, 4.0, ref.factor, 0.1, key=f"adfactor-{name}", disabled=mode != "scale"
        )
        if mode and (mode, factor if mode == "scale" else 1.0) != (ref.mode, ref.factor):
            args = ref.name, ref.sha256, ref.layers, ref.modules, ref.rank, mode
            config_state.set_adapter(run, AdapterRef(*args, factor if mode == "scale" else 1.0, ref.label))


def bundle(run: Run) -> None:
    """Download the session's configuration with its adapter files as one zip; import one back."""
    config = config_state.build(run)
    try:
        data = export.bundle(config)
    except BricklabError as exc:
        resources.show_error(exc)
    st.download_button("Download bundle (.zip)", data, "bricklab-bundle.zip", "application/zip")
    upload = st.file_uploader("Import a bundle (.zip)", type=["zip"], key="ad-bundle")
    if upload is not None and st.button("Use this bundle"):
        try:
            loaded = export.unbundle(upload.getvalue(), run)
        except BricklabError as exc:
            resources.show_error(exc)
        config_state.replace_with(run, loaded)
        st.success(f"Imported {len(loaded.bricks)} bricks and {len(loaded.adapters)} adapters.")
