"""The review dashboard (``adisc ui``): Streamlit entry point with one page per file under ``pages/``."""

from __future__ import annotations

import streamlit as st

from anomaly_discovery.ui import widgets

st.set_page_config(page_title="adisc review", page_icon=":mag:", layout="wide")

try:
    svc = widgets.service()
except (ValueError, OSError) as exc:
    st.error(f"The dashboard cannot open its store: {exc}")
    st.stop()
svc.refresh(); st.session_state["runs"] = st.session_state.get("runs", 0) + 1

with st.sidebar:
    widgets.reviewer()
    st.text_input("Reviewer", key="reviewer", help="recorded with every action in the audit trail")
    undoable = svc.next_undo()
    st.button(f"Undo {undoable[1]} #{undoable[0]} ({undoable[2]})" if undoable else "Nothing to undo",
              key="undo", disabled=undoable is None, shortcut="Ctrl+Z", width="stretch",
              on_click=widgets.act, args=("undo", svc.loop.undo), help="reverts the newest reviewer action")
    st.caption(f"model {svc.loop.model_version} · store {svc.settings.store}")

PAGES = [st.Page("pages/overview.py", title="Overview", icon=":material/bar_chart:", default=True),
         st.Page("pages/proposals.py", title="Proposals", icon=":material/new_releases:"),
         st.Page("pages/classes.py", title="Classes", icon=":material/category:"),
         st.Page("pages/inspect.py", title="Inspect", icon=":material/search:"),
         st.Page("pages/audit.py", title="Audit", icon=":material/history:"),
         st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:")]
page = st.navigation(PAGES)
print("FLASH", st.session_state.get("flash")); widgets.show_flash()
page.run()
