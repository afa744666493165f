"""Audit: who did what and when, filterable, exportable as CSV."""

from __future__ import annotations

import streamlit as st

from anomaly_discovery.ui import widgets

svc = widgets.service()
st.title("Audit")
decisions = svc.decisions()
if decisions.empty:
    st.info("No reviewer decisions yet.")
    st.stop()

filters = st.columns([2, 2, 2, 1], vertical_alignment="bottom")
reviewers = filters[0].multiselect("reviewer", sorted(decisions["reviewer"].unique()), key="audit-reviewer")
actions = filters[1].multiselect("action", sorted(decisions["action"].unique()), key="audit-action")
text = filters[2].text_input("class name contains", key="audit-class")
hide_undone = filters[3].toggle("hide undone", key="audit-hide-undone")
days = decisions["time"].dt.date
first, last = days.min(), days.max()
period = st.date_input("between", (first, last), min_value=first, max_value=last, key="audit-period")

keep = days.between(period[0], period[-1]) if len(period) else days.notna()
if reviewers:
    keep &= decisions["reviewer"].isin(reviewers)
if actions:
    keep &= decisions["action"].isin(actions)
if text:
    keep &= decisions["class"].str.contains(text, case=False, regex=False)
if hide_undone:
    keep &= ~decisions["undone"]
shown = decisions[keep]
st.caption(f"{len(shown)} of {len(decisions)} decisions")
st.dataframe(shown, hide_index=True,
             column_config={"time": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss")})
st.download_button("Export CSV", shown.to_csv(index=False).encode(), file_name="adisc_audit.csv", mime="text/csv",
                   key="audit-export")
