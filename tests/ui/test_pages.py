"""Every dashboard page under ``streamlit.testing.v1.AppTest``, and every review action: it reaches the store (with
an audit row naming the reviewer) and the sidebar's undo puts the store back as it was."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.storage.store import Store, classes, current_assignments, decisions, proposals
from anomaly_discovery.platform.storage.models import ClassStatus, ProposalStatus
from anomaly_discovery.ui.service import JOB_STATUS_FILE, MAX_UPLOAD_PIXELS
from tests.platform.serve_world import DIM, defect_image, png_bytes
from tests.ui.conftest import APP

REVIEWER = "ana"


def store_state(settings) -> tuple:
    """Classes (id, name, status), proposals (id, status, size) and current assignments (region, class)."""
    store = Store(settings.store, upgrade=False)
    try:
        with store.session() as session:
            return (sorted((c.id, c.name, c.status.value) for c in classes(session)),
                    sorted((p.id, p.status.value, p.size) for p in proposals(session)),
                    sorted((r, a.class_id) for r, a in current_assignments(session).items()))
    finally:
        store.dispose()


def newest_decision(settings):
    store = Store(settings.store, upgrade=False)
    try:
        with store.session() as session:
            found = decisions(session, limit=1)
            return found[0] if found else None
    finally:
        store.dispose()


def open_page(page: str) -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.session_state["reviewer"] = REVIEWER
    app.run()
    if page != "overview":
        app.switch_page(f"views/{page}.py").run()
    assert not app.exception, app.exception
    return app


def undo(app: AppTest) -> AppTest:
    app.sidebar.button(key="undo").click().run()
    assert not app.exception, app.exception
    return app


def success(app: AppTest) -> str:
    assert not app.error, [e.value for e in app.error]
    assert app.success, "the action left no message"
    return app.success[0].value


def crops(app: AppTest) -> int:
    """Crops the page's gallery shows (one image-list element)."""
    return len(app.image[-1].value) if app.image else 0


def shown_ids(app: AppTest, gallery: str) -> list[int]:
    """Region ids of the crops a gallery shows (the options of its tick list)."""
    return [int(option.lstrip("#")) for option in app.multiselect(key=f"{gallery}-ticked").options]


def class_id(settings, name: str) -> int:
    return next(c[0] for c in store_state(settings)[0] if c[1] == name)


def members(settings, class_name: str) -> list[int]:
    wanted = class_id(settings, class_name)
    return [r for r, c in store_state(settings)[2] if c == wanted]


# ---------------------------------------------------------------------------------------------- pages
def test_a_missing_store_is_an_error_message_not_a_traceback(world, monkeypatch):
    monkeypatch.setenv("ADISC_UI_STORE", f"sqlite:///{world.workdir / 'missing.db'}")
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not app.exception
    assert "no store at" in app.error[0].value and "adisc demo" in app.error[0].value
    assert not (world.workdir / "missing.db").exists()


def test_overview_shows_class_counts_model_version_and_no_job(world):
    app = open_page("overview")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["regions"] == "48" and metrics["open proposals"] == "2"
    assert metrics["model version"] == "discovery-1"
    counts = app.dataframe[0].value
    assert counts["regions"].sum() == 48 and counts["cumulative %"].iloc[-1] == pytest.approx(100.0)
    assert {"rust", "stain"} <= set(counts["class"])
    assert any("no job running" in c.value for c in app.caption)


def test_overview_reads_the_job_state_from_the_status_file(world):
    (world.workdir / JOB_STATUS_FILE).write_text(json.dumps({"job": "train", "state": "running", "epoch": 3}))
    app = open_page("overview")
    jobs = app.dataframe[1].value
    assert jobs.iloc[0]["job"] == "train" and jobs.iloc[0]["state"] == "running"


def test_overview_trend_groups_by_hour_without_error(world):
    app = open_page("overview")
    app.segmented_control(key="trend-grouping").set_value("hour").run()
    assert not app.exception and not app.error


def test_proposals_page_shows_crops_facts_and_nearest_known_classes(world):
    app = open_page("proposals")
    assert crops(app) == 12 and len(shown_ids(app, f"proposal-{app.session_state['proposal']}")) == 12
    assert {m.label for m in app.metric} == {"size (regions)", "cohesion (mean cosine to prototype)"}
    nearest = app.dataframe[0].value
    assert set(nearest["class"]) == {"rust", "stain"}
    assert ((nearest["similarity"] >= -1) & (nearest["similarity"] <= 1)).all()


def test_next_button_walks_the_proposal_queue(world):
    app = open_page("proposals")
    first = app.session_state["proposal"]
    app.button(key="next").click().run()
    assert app.session_state["proposal"] != first
    app.button(key="next").click().run()
    assert app.session_state["proposal"] == first


# ---------------------------------------------------------------------------------------------- proposal actions
def test_confirm_with_a_name_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("proposals")
    proposal = app.session_state["proposal"]
    app.text_input(key=f"confirm-name-{proposal}").input("hole")
    app.button(key="confirm").click().run()
    assert "confirm" in success(app)
    names = {c[1]: c[2] for c in store_state(world)[0]}
    assert names["hole"] == "confirmed"
    decision = newest_decision(world)
    assert (decision.action, decision.reviewer, decision.proposal_id) == ("confirm", REVIEWER, proposal)
    undo(app)
    assert store_state(world) == before
    assert newest_decision(world).action == "undo"


def test_reject_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("proposals")
    proposal = app.session_state["proposal"]
    app.button(key="reject").click().run()
    success(app)
    assert (proposal, "rejected") in {(p[0], p[1]) for p in store_state(world)[1]}
    assert crops(app) == 12, "the next open proposal is shown"
    undo(app)
    assert store_state(world) == before


def test_rename_proposal_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("proposals")
    proposal = app.session_state["proposal"]
    app.text_input(key=f"rename-name-{proposal}").input("maybe crack")
    app.button(key="rename").click().run()
    success(app)
    assert ("maybe crack", "proposed") in {(c[1], c[2]) for c in store_state(world)[0]}
    undo(app)
    assert store_state(world) == before


def test_merge_proposal_into_a_known_class_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    rust = class_id(world, "rust")
    app = open_page("proposals")
    proposal = app.session_state["proposal"]
    app.selectbox(key=f"merge-target-{proposal}").set_value(rust).run()
    app.button(key="merge").click().run()
    success(app)
    assert len(members(world, "rust")) == 24
    assert (proposal, ProposalStatus.SUPERSEDED.value) in {(p[0], p[1]) for p in store_state(world)[1]}
    undo(app)
    assert store_state(world) == before


def test_split_proposal_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("proposals")
    app.number_input(key=f"split-k-{app.session_state['proposal']}").set_value(2).run()
    app.button(key="split").click().run()
    success(app)
    after = store_state(world)
    assert len(after[1]) == len(before[1]) + 1, "the split-off part is a new proposal"
    assert newest_decision(world).action == "split"
    undo(app)
    state = store_state(world)
    assert state[2] == before[2], "every region is back in its class"
    assert {p for p in state[1] if p[1] == "open"} == {p for p in before[1] if p[1] == "open"}


def test_ticked_crops_move_to_a_known_class_and_undo_reverts_it(world):
    before = store_state(world)
    stain = class_id(world, "stain")
    app = open_page("proposals")
    key = f"proposal-{app.session_state['proposal']}"
    ticked = shown_ids(app, key)[:3]
    app.multiselect(key=f"{key}-ticked").set_value(ticked)
    app.selectbox(key=f"{key}-move-target").set_value(stain)
    app.button(key=f"{key}-move").click().run()
    success(app)
    assert set(ticked) <= set(members(world, "stain"))
    assert crops(app) == 9 and not set(ticked) & set(shown_ids(app, key))
    undo(app)
    assert store_state(world) == before


def test_ticked_crops_are_dropped_to_unassigned_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("proposals")
    key = f"proposal-{app.session_state['proposal']}"
    app.button(key=f"{key}-tick-all").click().run()
    assert app.multiselect(key=f"{key}-ticked").value == shown_ids(app, key)
    app.multiselect(key=f"{key}-ticked").unselect(shown_ids(app, key)[0])
    app.button(key=f"{key}-drop").click().run()
    success(app)
    unassigned = [r for r, c in store_state(world)[2] if c is None]
    assert len(unassigned) == 11
    undo(app)
    assert store_state(world) == before


def test_moving_nothing_ticked_says_so(world):
    app = open_page("proposals")
    app.button(key=f"proposal-{app.session_state['proposal']}-drop").click().run()
    assert "tick the crops" in app.error[0].value


def test_confirm_with_a_taken_name_shows_the_reason_and_changes_nothing(world):
    before = store_state(world)
    app = open_page("proposals")
    app.text_input(key=f"confirm-name-{app.session_state['proposal']}").input("rust")
    app.button(key="confirm").click().run()
    assert "already used" in app.error[0].value and not app.exception
    assert store_state(world) == before


def test_a_proposal_changed_elsewhere_is_a_conflict_not_a_traceback(world):
    app = open_page("proposals")
    proposal = app.session_state["proposal"]
    other = DiscoveryLoop(Store(world.store), world.index, DIM)
    class_of = next(p.class_id for p in other.list_proposals() if p.id == proposal)
    other.rename(class_of, "renamed elsewhere", reviewer="bo")
    other.close()
    other.store.dispose()
    app.text_input(key=f"confirm-name-{proposal}").input("hole")
    app.button(key="confirm").click().run()
    assert not app.exception
    assert "failed" in app.error[0].value
    assert ("renamed elsewhere", "proposed") in {(c[1], c[2]) for c in store_state(world)[0]}


# ---------------------------------------------------------------------------------------------- classes page
def test_classes_page_pages_through_members(world):
    other = DiscoveryLoop(Store(world.store), world.index, DIM)
    rust = class_id(world, "rust")
    other.merge(class_id(world, "stain"), rust, reviewer="bo")
    other.close()
    other.store.dispose()
    app = open_page("classes")
    app.selectbox(key="class").set_value(rust).run()
    assert crops(app) == 24
    app.selectbox(key="gallery-page-size").set_value(12).run()
    first = set(shown_ids(app, f"class-{rust}"))
    app.number_input(key=f"class-{rust}-page").set_value(2).run()
    second = set(shown_ids(app, f"class-{rust}"))
    assert len(first) == len(second) == 12 and crops(app) == 12
    assert first | second == set(members(world, "rust"))


def test_rename_class_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("classes")
    app.selectbox(key="class").set_value(class_id(world, "rust")).run()
    app.text_input(key=f"class-name-{class_id(world, 'rust')}").input("corrosion")
    app.button(key="class-rename").click().run()
    success(app)
    assert ("corrosion", "known") in {(c[1], c[2]) for c in store_state(world)[0]}
    undo(app)
    assert store_state(world) == before


def test_merge_class_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    rust, stain = class_id(world, "rust"), class_id(world, "stain")
    app = open_page("classes")
    app.selectbox(key="class").set_value(stain).run()
    app.selectbox(key=f"class-merge-target-{stain}").set_value(rust).run()
    app.button(key="class-merge").click().run()
    success(app)
    assert (stain, "stain", ClassStatus.MERGED.value) in store_state(world)[0]
    assert len(members(world, "rust")) == 24
    undo(app)
    assert store_state(world) == before


def test_split_class_reaches_the_store_and_undo_reverts_it(world):
    before = store_state(world)
    app = open_page("classes")
    app.button(key="class-split").click().run()
    success(app)
    assert len(store_state(world)[0]) == len(before[0]) + 1
    undo(app)
    state = store_state(world)
    assert state[2] == before[2]


def test_misassigned_region_moves_to_another_class_and_undo_reverts_it(world):
    before = store_state(world)
    rust, stain = class_id(world, "rust"), class_id(world, "stain")
    app = open_page("classes")
    app.selectbox(key="class").set_value(rust).run()
    moved = shown_ids(app, f"class-{rust}")[0]
    app.multiselect(key=f"class-{rust}-ticked").select(moved)
    app.selectbox(key=f"class-{rust}-move-target").set_value(stain)
    app.button(key=f"class-{rust}-move").click().run()
    success(app)
    assert moved in members(world, "stain")
    undo(app)
    assert store_state(world) == before


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_labels_a_known_defect_and_shows_the_overlay(world):
    app = open_page("inspect")
    app.file_uploader(key="inspect-upload").set_value(("rust.png", png_bytes(defect_image("rust", 999)),
                                                       "image/png")).run()
    assert not app.exception and not app.error
    assert len(app.image) == 2
    regions = app.dataframe[0].value
    assert regions.iloc[0]["label"] == "rust" and regions.iloc[0]["kind"] == "class"
    assert 0.0 <= float(app.metric[0].value) <= 1.0


def test_inspect_says_new_for_a_defect_like_an_open_proposal(world):
    app = open_page("inspect")
    app.file_uploader(key="inspect-upload").set_value(("hole.png", png_bytes(defect_image("hole", 999)),
                                                       "image/png")).run()
    region = app.dataframe[0].value.iloc[0]
    assert (region["kind"], region["label"]) == ("new", "new")


def test_inspect_shows_an_error_for_a_file_that_is_not_an_image(world):
    app = open_page("inspect")
    app.file_uploader(key="inspect-upload").set_value(("notes.png", b"this is not an image", "image/png")).run()
    assert not app.exception
    assert "not an image" in app.error[0].value


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` × ``height`` pixels (the size is read before any pixel)."""
    data = bytearray(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_inspect_shows_an_error_for_a_huge_image(world):
    side = int(np.sqrt(MAX_UPLOAD_PIXELS)) + 16
    huge = png_claiming(side, side)
    app = open_page("inspect")
    app.file_uploader(key="inspect-upload").set_value(("huge.png", huge, "image/png")).run()
    assert not app.exception
    assert "over the limit" in app.error[0].value


# ---------------------------------------------------------------------------------------------- audit, evaluation
def test_audit_lists_decisions_filters_them_and_exports_csv(world):
    app = open_page("proposals")
    app.button(key="reject").click().run()
    undo(app)
    app.switch_page("views/audit.py").run()
    table = app.dataframe[0].value
    assert list(table["action"]) == ["undo", "reject"] and set(table["reviewer"]) == {REVIEWER}
    assert table["undone"].tolist() == [False, True]
    app.multiselect(key="audit-action").set_value(["reject"]).run()
    assert list(app.dataframe[0].value["action"]) == ["reject"]
    app.toggle(key="audit-hide-undone").set_value(True).run()
    assert app.dataframe[0].value.empty
    assert app.download_button(key="audit-export").label == "Export CSV"


def test_evaluation_scores_current_classes_with_unknown_for_rejected_regions(world):
    app = open_page("evaluation")
    metrics = {m.label: float(m.value) for m in app.metric}
    assert metrics["NMI"] == pytest.approx(1.0) and metrics["F1"] == pytest.approx(1.0)
    app.switch_page("views/proposals.py").run()
    app.button(key="reject").click().run()
    app.switch_page("views/evaluation.py").run()
    confusion = app.dataframe[0].value
    assert "unknown" in confusion.columns and confusion["unknown"].sum() == 12
    assert confusion.to_numpy().sum() == 48 and len(confusion.columns) == 4


def test_evaluation_without_labels_says_they_are_unknown_and_a_bad_folder_is_an_error(world, monkeypatch):
    monkeypatch.setenv("ADISC_UI_DATA", str(world.workdir / "no-such-folder"))
    app = open_page("evaluation")
    assert "Labels are unknown" in app.info[0].value
    app.text_input(key="evaluation-data").set_value(str(world.workdir / "no-such-folder")).run()
    assert not app.exception
    assert "Cannot evaluate" in app.error[0].value


def test_evaluation_draws_the_active_loop_curve_from_the_workdir(world):
    (world.workdir / "active_loop.json").write_text(json.dumps(
        {"curve": [{"reviewed": 0, "f1": 0.5}, {"reviewed": 20, "f1": 0.8}]}))
    app = open_page("evaluation")
    assert app.dataframe[-1].value["f1"].tolist() == [0.5, 0.8]
