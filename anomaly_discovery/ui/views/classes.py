"""Classes: each class's members in a paged gallery; move misassigned regions, rename, merge, split."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from anomaly_discovery.ui import widgets

svc = widgets.service()
st.title("Classes")
classes = {c.id: c for c in svc.classes()}
if not classes:
    st.info("The store holds no classes yet.")
    st.stop()

st.dataframe(pd.DataFrame([{"id": c.id, "name": c.name, "status": c.status, "regions": c.size}
                           for c in classes.values()]), hide_index=True, height=min(400, 38 + 35 * len(classes)))
if st.session_state.get("class") not in classes:
    st.session_state["class"] = next(iter(classes))
st.selectbox("class", list(classes), key="class",
             format_func=lambda i: f"{classes[i].name} · {classes[i].status} · {classes[i].size} regions")
chosen = classes[st.session_state["class"]]
targets = {c.id: c for c in svc.reference_classes() if c.id != chosen.id}
suffix = str(chosen.id)


def rename() -> None:
    widgets.act(f"rename {chosen.name}", svc.loop.rename, chosen.id, st.session_state[f"class-name-{suffix}"],
                expected_version=chosen.version)


def merge() -> None:
    target = targets[st.session_state[f"class-merge-target-{suffix}"]]
    widgets.act(f"merge {chosen.name} into {target.name}", svc.loop.merge, chosen.id, target.id,
                expected_version=chosen.version, target_version=target.version)


def split() -> None:
    widgets.act(f"split {chosen.name}", svc.loop.split, chosen.id, int(st.session_state[f"class-split-k-{suffix}"]),
                expected_version=chosen.version)


rename_tab, merge_tab, split_tab = st.tabs(["Rename", "Merge into another class", "Split"])
with rename_tab.form(f"class-rename-form-{suffix}", border=False):
    st.text_input("new name", value=chosen.name, key=f"class-name-{suffix}")
    st.form_submit_button("Rename", key="class-rename", on_click=rename)
with merge_tab:
    if targets:
        st.selectbox("merge into", list(targets), key=f"class-merge-target-{suffix}",
                     format_func=lambda i: f"{targets[i].name} ({targets[i].size})")
        st.button("Merge", key="class-merge", on_click=merge)
    else:
        st.caption("no other known or confirmed class")
with split_tab:
    st.number_input("parts (k-means on the members' embeddings)", 2, max(2, chosen.size), 2,
                    key=f"class-split-k-{suffix}")
    st.button("Split", key="class-split", disabled=chosen.size < 2, on_click=split)

st.subheader(f"Members of {chosen.name}")
widgets.gallery(f"class-{suffix}", svc.members(chosen.id), svc, targets, drop_label="Unassign")
