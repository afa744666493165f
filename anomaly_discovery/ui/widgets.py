"""Streamlit pieces every page shares: the cached service, the reviewer's name, running an action, the gallery.

Actions run in button callbacks (before the script reruns), so the page that follows already shows their effect;
their outcome — or the loop's refusal, e.g. a stale version — is kept in ``st.session_state["flash"]`` and shown
at the top of the next run.
"""

from __future__ import annotations

import gc
import getpass
from collections.abc import Callable

import streamlit as st

from anomaly_discovery.platform.review.loop import LoopError
from anomaly_discovery.platform.storage.store import ConflictError
from anomaly_discovery.ui.service import ClassRow, RegionRow, ReviewService
from anomaly_discovery.ui.settings import UISettings
from anomaly_discovery.platform.review.thumbnails import OVERLAYS, region_thumbnail

PAGE_SIZES = (12, 24, 48, 100, 200)
THUMBNAIL_PX = 128


@st.cache_resource(show_spinner="opening the store and index")
def _service(settings: UISettings) -> ReviewService:
    """Opened once per process; then every object so far leaves the garbage collector's reach (``gc.freeze``,
    as the Serve replicas do): full collections over torch, faiss, SQLAlchemy and altair objects would
    otherwise stall page runs now and then and take seconds at shutdown."""
    service = ReviewService(settings)
    gc.freeze()
    return service


def service() -> ReviewService:
    """The process's service for the settings ``adisc ui`` passed (environment variables ``ADISC_UI_*``); raises
    ``ValueError`` / ``FileNotFoundError`` naming what is missing."""
    settings = UISettings.from_environment()
    settings.check()
    return _service(settings)


thumbnail = st.cache_data(max_entries=20_000, show_spinner=False)(region_thumbnail)


def reviewer() -> str:
    if "reviewer" not in st.session_state:
        st.session_state["reviewer"] = getpass.getuser() or "inspector"
    return st.session_state["reviewer"]


def act(description: str, action: Callable, *args, clear: tuple[str, ...] = (), **kwargs) -> None:
    """Run one loop action as the current reviewer and remember its outcome for the next run; ``clear`` names
    session-state keys (selections) to forget after a success."""
    try:
        result = action(*args, reviewer=reviewer(), **kwargs)
    except (LoopError, ConflictError) as exc:
        st.session_state["flash"] = ("error", f"{description} failed: {exc}")
        return
    for key in clear:
        st.session_state.pop(key, None)
    st.session_state["flash"] = ("success", f"{description}: done (decision #{result.decision_id}, "
                                            f"{result.n_regions} regions changed, {result.seconds:.2f} s)")


def show_flash() -> None:
    kind, message = st.session_state.pop("flash", (None, None))
    if kind == "error":
        st.error(message)
    elif kind == "success":
        st.success(message)


def ticked_key(key: str) -> str:
    return f"{key}-ticked"


def tick(key: str, region_ids: list[int]) -> None:
    st.session_state[ticked_key(key)] = list(region_ids)


def move_ticked(key: str, svc: ReviewService, target: ClassRow | None) -> None:
    """Move the ticked crops to ``target`` (``None``: unassign them)."""
    ticked = st.session_state.get(ticked_key(key)) or []
    if not ticked:
        st.session_state["flash"] = ("error", "tick the crops to move first")
        return
    act(f"move {len(ticked)} regions to {target.name if target else 'unassigned'}", svc.loop.move, ticked,
        target.id if target else None, expected_version=target.version if target else None,
        clear=(ticked_key(key),))


def pick_form(key: str, regions: list[RegionRow], svc: ReviewService, targets: dict[int, ClassRow],
              drop_label: str) -> None:
    """Tick crops by number (one widget: 200 tick boxes would take seconds to draw) and move or unassign them."""
    shown = [r.id for r in regions]
    ticked = ticked_key(key)
    st.session_state[ticked] = [r for r in st.session_state.get(ticked, []) if r in shown]
    with st.container(horizontal=True, vertical_alignment="bottom"):
        st.button("Tick all shown", key=f"{key}-tick-all", on_click=tick, args=(key, shown))
        st.button("Clear ticks", key=f"{key}-clear", on_click=tick, args=(key, []))
    with st.form(f"{key}-pick", border=False):
        columns = st.columns([3, 2, 1, 2], vertical_alignment="bottom")
        columns[0].multiselect("ticked crops (type a crop's number)", shown, key=ticked,
                               format_func=lambda i: f"#{i}")
        if targets:
            columns[1].selectbox("move them to", list(targets), key=f"{key}-move-target",
                                 format_func=lambda i: f"{targets[i].name} ({targets[i].size})")
            columns[2].form_submit_button("Move", key=f"{key}-move", on_click=lambda: move_ticked(
                key, svc, targets[st.session_state[f"{key}-move-target"]]))
        columns[3].form_submit_button(drop_label, key=f"{key}-drop", on_click=move_ticked, args=(key, svc, None))


def gallery(key: str, region_ids: list[int], svc: ReviewService, targets: dict[int, ClassRow],
            drop_label: str) -> None:
    """A paged grid of region crops under the controls to tick some and move them to one of ``targets`` or
    unassign them. Overlay and page size are the session's, the page number is this gallery's. The crops are one
    image-list element: 200 separate elements take the browser several times longer to draw."""
    controls = st.columns([2, 2, 3])
    st.session_state.setdefault("gallery-overlay", OVERLAYS[0])
    st.session_state.setdefault("gallery-page-size", 48)
    overlay = controls[0].selectbox("overlay", OVERLAYS, key="gallery-overlay")
    page_size = controls[1].selectbox("crops per page", PAGE_SIZES, key="gallery-page-size")
    pages = max(1, -(-len(region_ids) // page_size))
    if st.session_state.get(f"{key}-page", 1) > pages:
        st.session_state[f"{key}-page"] = pages
    page = controls[2].number_input(f"page (of {pages})", 1, pages, 1, key=f"{key}-page") if pages > 1 else 1
    regions = svc.regions(region_ids[(page - 1) * page_size:page * page_size])
    pick_form(key, regions, svc, targets, drop_label)
    if regions:
        st.image([thumbnail(r.image_path, r.box, r.mask_path, overlay, THUMBNAIL_PX) for r in regions],
                 caption=[f"#{r.id} · {r.anomaly_score:.2f}" for r in regions], width=THUMBNAIL_PX)
