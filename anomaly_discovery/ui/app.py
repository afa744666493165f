"""The review dashboard (``adisc ui``): the Streamlit entry point, one page per file under ``views/``.

The folder is not called ``pages/``: next to the entry script that name switches Streamlit to its legacy
multipage mode until ``st.navigation`` first runs, so a new server's first deep link (and every page switch under
``AppTest``) would run a page without this script: no settings check, sidebar, undo or messages.
"""

from __future__ import annotations

import streamlit as st

from anomaly_discovery.ui import widgets

st.set_page_config(page_title="adisc review", page_icon=":mag:", layout="wide")

try:
    svc = widgets.service()
except (ValueError, OSError) as exc:
    st.error(f"The dashboard cannot open its store: {exc}")
    st.stop()
svc.refresh()

with st.sidebar:
    widgets.reviewer()
    st.text_input("Reviewer", key="reviewer", help="recorded with every action in the audit trail")
    undoable = svc.next_undo()
    st.button(f"Undo {undoable[1]} #{undoable[0]} ({undoable[2]})" if undoable else "Nothing to undo",
              key="undo", disabled=undoable is None, shortcut="Ctrl+Z", width="stretch",
              on_click=widgets.act, args=("undo", svc.loop.undo), help="reverts the newest reviewer action")
    st.caption(f"model {svc.loop.model_version} · store {svc.settings.store}")

PAGES = [st.Page("views/overview.py", title="Overview", icon=":material/bar_chart:", default=True),
         st.Page("views/proposals.py", title="Proposals", icon=":material/new_releases:"),
         st.Page("views/classes.py", title="Classes", icon=":material/category:"),
         st.Page("views/inspect.py", title="Inspect", icon=":material/search:"),
         st.Page("views/audit.py", title="Audit", icon=":material/history:"),
         st.Page("views/export.py", title="Export", icon=":material/download:"),
         st.Page("views/evaluation.py", title="Evaluation", icon=":material/analytics:")]
page = st.navigation(PAGES)
widgets.show_flash()
page.run()
