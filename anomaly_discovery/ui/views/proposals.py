"""Proposals: the queue of proposed new classes, their crops, and the reviewer's decisions on them.

Keys: ``N`` / ``P`` next / previous proposal, ``Ctrl+Enter`` confirm, ``Ctrl+Z`` undo (sidebar); Enter in a name
field submits its form.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from anomaly_discovery.ui import widgets

svc = widgets.service()
st.title("Proposals")
queue = svc.open_proposals()
if not queue:
    st.info("No open proposals: every proposed class has been reviewed.")
    st.stop()

ids = [p.id for p in queue]
by_id = {p.id: p for p in queue}
if st.session_state.get("proposal") not in by_id:
    st.session_state["proposal"] = ids[0]


def step(offset: int) -> None:
    st.session_state["proposal"] = ids[(ids.index(st.session_state["proposal"]) + offset) % len(ids)]


nav = st.columns([6, 1, 1], vertical_alignment="bottom")
nav[0].selectbox(f"queue ({len(queue)} open, largest first)", ids, key="proposal",
                 format_func=lambda i: f"#{i} {by_id[i].name} · {by_id[i].size} regions · "
                                       f"cohesion {by_id[i].cohesion:.2f}")
nav[1].button("◀ Previous", key="previous", on_click=step, args=(-1,), shortcut="P", width="stretch")
nav[2].button("Next ▶", key="next", on_click=step, args=(1,), shortcut="N", width="stretch")
proposal = by_id[st.session_state["proposal"]]

facts, neighbours = st.columns([1, 2])
facts.metric("size (regions)", proposal.size)
facts.metric("cohesion (mean cosine to prototype)", f"{proposal.cohesion:.3f}")
facts.caption(f"proposal #{proposal.id} v{proposal.version} · class #{proposal.class_id} · "
              f"created {proposal.created_at:%Y-%m-%d %H:%M} UTC")
neighbours.markdown("**Nearest known classes**")
nearest = svc.nearest_classes(proposal.class_id)
if nearest:
    neighbours.dataframe(pd.DataFrame(nearest, columns=["class", "similarity"]), hide_index=True,
                         column_config={"similarity": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                                      format="%.3f")})
else:
    neighbours.caption("no known classes yet")

references = {c.id: c for c in svc.reference_classes()}
label = {i: f"{c.name} ({c.size})" for i, c in references.items()}
suffix = str(proposal.id)


def confirm() -> None:
    widgets.act(f"confirm proposal #{proposal.id}", svc.loop.confirm, proposal.id,
                st.session_state[f"confirm-name-{suffix}"], expected_version=proposal.version)


def merge() -> None:
    target = st.session_state[f"merge-target-{suffix}"]
    widgets.act(f"merge proposal #{proposal.id} into {references[target].name}", svc.loop.merge_proposal,
                proposal.id, target, expected_version=proposal.version, target_version=references[target].version)


def rename() -> None:
    widgets.act(f"rename proposal #{proposal.id}", svc.loop.rename, proposal.class_id,
                st.session_state[f"rename-name-{suffix}"], expected_version=proposal.class_version)


def split() -> None:
    widgets.act(f"split proposal #{proposal.id}", svc.loop.split, proposal.class_id,
                int(st.session_state[f"split-k-{suffix}"]), expected_version=proposal.class_version)


def reject() -> None:
    widgets.act(f"reject proposal #{proposal.id}", svc.loop.reject, proposal.id, expected_version=proposal.version)


confirm_tab, merge_tab, rename_tab, split_tab, reject_tab = st.tabs(
    ["Confirm", "Merge into a class", "Rename", "Split", "Reject"])
with confirm_tab.form(f"confirm-form-{suffix}", border=False):
    st.text_input("name of the new defect class", key=f"confirm-name-{suffix}", placeholder="e.g. scratch")
    st.form_submit_button("Confirm as a new class", key="confirm", type="primary", shortcut="Ctrl+Enter",
                          on_click=confirm)
with merge_tab:
    if references:
        st.selectbox("existing class", list(references), key=f"merge-target-{suffix}", format_func=label.get)
        st.button("Merge into this class", key="merge", on_click=merge)
    else:
        st.caption("no known or confirmed class to merge into")
with rename_tab.form(f"rename-form-{suffix}", border=False):
    st.text_input("new name", value=proposal.name, key=f"rename-name-{suffix}")
    st.form_submit_button("Rename", key="rename", on_click=rename)
with split_tab:
    st.number_input("parts (k-means on the members' embeddings)", 2, max(2, proposal.size), 2, key=f"split-k-{suffix}")
    st.button("Split", key="split", disabled=proposal.size < 2, on_click=split)
with reject_tab:
    st.caption("Its regions go back to unassigned and are not proposed again.")
    st.button("Reject this proposal", key="reject", on_click=reject)

st.subheader("Crops")
st.caption("representatives first · yellow box: the region · green outline: defect mask · colours: anomaly map")
members = svc.members(proposal.class_id)
representatives = [r for r in proposal.representatives if r in set(members)]
widgets.gallery(f"proposal-{suffix}", representatives + sorted(set(members) - set(representatives)), svc, references,
                drop_label="Drop (unassign)")
