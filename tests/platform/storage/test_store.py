"""The review store on SQLite and PostgreSQL: migrations, repository primitives, optimistic locking, atomicity."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from anomaly_discovery.platform.storage.store import (ConflictError, NewAssignment, NewImage, NewRegion, Store,
                                                      activate_model_version, active_model_version, add_class,
                                                      add_images, add_model_version, add_proposal, add_regions,
                                                      assignment_history, begin_snapshot, classes, content_hash,
                                                      current_assignments,
                                                      decisions, default_database_url, expect_version,
                                                      get_or_create_dataset, get_or_create_product, proposals,
                                                      record_decision, set_assignments, upgrade_database)
from anomaly_discovery.platform.storage.models import (AssignmentSource, Base, ClassStatus, Decision, DefectClass,
                                                       ModelVersion, Proposal, ProposalStatus, Region)

TABLES = {"products", "datasets", "images", "regions", "classes", "assignments", "proposals", "decisions",
          "model_versions", "model_classes"}


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    yield store
    store.dispose()


def _seed_regions(store: Store, n_regions: int = 4) -> list[int]:
    with store.session() as session:
        product = get_or_create_product(session, "bottle")
        dataset = get_or_create_dataset(session, product, "line-1", root="/data/line-1")
        image_ids = add_images(session, dataset, [NewImage("a.png", "0" * 64), NewImage("b.png", "1" * 64)])
        return add_regions(session, [NewRegion(image_ids[i % 2], (i, i, i + 5, i + 7), 0.5 + i / 10,
                                               embedding_id=100 + i) for i in range(n_regions)])


def _seed_proposal(store: Store) -> int:
    region_ids = _seed_regions(store)
    with store.session() as session:
        proposed = add_class(session, "new-1")
        return add_proposal(session, proposed, region_ids[:2], size=len(region_ids), cohesion=0.8).id


def test_migrations_create_the_schema_the_models_describe(database_url):
    upgrade_database(database_url)
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert TABLES <= set(inspect(connection).get_table_names())
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_upgrading_twice_is_a_no_op(sqlite_url):
    upgrade_database(sqlite_url)
    upgrade_database(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
    engine.dispose()


def test_concurrent_upgrades_are_serialised(database_url):
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(upgrade_database, [database_url] * 3))
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    engine.dispose()


def test_images_and_regions_round_trip_in_input_order(store):
    region_ids = _seed_regions(store, n_regions=5)
    with store.session() as session:
        regions = [session.get(Region, region_id) for region_id in region_ids]
        assert [r.embedding_id for r in regions] == [100, 101, 102, 103, 104]
        assert (regions[2].x0, regions[2].y0, regions[2].x1, regions[2].y1) == (2, 2, 7, 9)
        assert regions[1].image.path == "b.png" and regions[1].image.dataset.product.name == "bottle"
        assert regions[0].image.arrived_at.tzinfo == timezone.utc


def test_get_or_create_returns_the_existing_product_and_dataset(store):
    with store.session() as session:
        first = get_or_create_dataset(session, get_or_create_product(session, "tile"), "a")
    with store.session() as session:
        again = get_or_create_dataset(session, get_or_create_product(session, "tile"), "a")
    assert again.id == first.id


def test_add_regions_refuses_an_empty_box(store):
    with store.session() as session:
        dataset = get_or_create_dataset(session, get_or_create_product(session, "p"), "d")
        image_id = add_images(session, dataset, [NewImage("x.png", "2" * 64)])[0]
        with pytest.raises(ValueError, match=r"empty box \(3, 3, 3, 9\)"):
            add_regions(session, [NewRegion(image_id, (3, 3, 3, 9), 0.1)])


def test_set_assignments_keeps_one_current_row_per_region_and_the_history(store):
    region_ids = _seed_regions(store)
    with store.session() as session:
        scratch, dent = add_class(session, "scratch", ClassStatus.KNOWN), add_class(session, "dent", ClassStatus.KNOWN)
        set_assignments(session, [NewAssignment(r, scratch.id, 0.9) for r in region_ids], AssignmentSource.MODEL)
    with store.session() as session:
        decision = record_decision(session, "ana", "move", after={"region": region_ids[0], "class": dent.id})
        set_assignments(session, [NewAssignment(region_ids[0], dent.id)], AssignmentSource.REVIEWER, decision)
    with store.session() as session:
        current = current_assignments(session)
        history = assignment_history(session, region_ids[0])
        in_dent = current_assignments(session, class_ids=[dent.id])
    assert len(current) == len(region_ids)
    assert current[region_ids[0]].class_id == dent.id and current[region_ids[0]].source == AssignmentSource.REVIEWER
    assert current[region_ids[0]].decision_id == decision.id
    assert current[region_ids[1]].class_id == scratch.id and current[region_ids[1]].confidence == pytest.approx(0.9)
    assert [(a.class_id, a.is_current) for a in history] == [(scratch.id, False), (dent.id, True)]
    assert list(in_dent) == [region_ids[0]]


def test_set_assignments_refuses_two_assignments_for_one_region(store):
    region_ids = _seed_regions(store)
    with store.session() as session:
        with pytest.raises(ValueError, match=rf"region\(s\) \[{region_ids[0]}\]"):
            set_assignments(session, [NewAssignment(region_ids[0], None), NewAssignment(region_ids[0], None)],
                            AssignmentSource.MODEL)


def test_second_reviewer_on_the_same_proposal_gets_a_conflict_and_nothing_is_lost(store):
    proposal_id = _seed_proposal(store)
    with pytest.raises(ConflictError) as raised:
        with store.session() as loser:
            stale = loser.get(Proposal, proposal_id)
            with store.session() as winner:
                proposal = winner.get(Proposal, proposal_id)
                proposal.status = ProposalStatus.CONFIRMED
                record_decision(winner, "ana", "confirm", proposal=proposal, after={"status": "confirmed"})
            stale.status = ProposalStatus.REJECTED
            record_decision(loser, "ben", "reject", proposal=stale, after={"status": "rejected"})
    error = raised.value
    assert (error.entity, error.entity_id) == ("proposal", proposal_id)
    assert (error.expected_version, error.current_version) == (1, 2)
    assert f"proposal {proposal_id}" in str(error) and "version 2" in str(error)
    with store.session() as session:
        assert session.get(Proposal, proposal_id).status == ProposalStatus.CONFIRMED
        assert [(d.reviewer, d.action) for d in decisions(session)] == [("ana", "confirm")]


def test_concurrent_renames_of_one_class_conflict(store):
    with store.session() as session:
        class_id = add_class(session, "blob", ClassStatus.CONFIRMED).id
    with pytest.raises(ConflictError, match=rf"class {class_id} .*expected version 1.*version 2"):
        with store.session() as loser:
            stale = loser.get(DefectClass, class_id)
            with store.session() as winner:
                winner.get(DefectClass, class_id).name = "crack"
            stale.name = "hole"
    with store.session() as session:
        assert session.get(DefectClass, class_id).name == "crack"


def test_expect_version_rejects_a_stale_client_version(store):
    proposal_id = _seed_proposal(store)
    with store.session() as session:
        session.get(Proposal, proposal_id).cohesion = 0.5
    with store.session() as session:
        proposal = session.get(Proposal, proposal_id)
        expect_version(proposal, 2)
        with pytest.raises(ConflictError, match=rf"proposal {proposal_id} .*expected version 1.*version 2"):
            expect_version(proposal, 1)


def test_a_failed_change_rolls_back_its_decision_too(store):
    region_ids = _seed_regions(store)
    with store.session() as session:
        class_id = add_class(session, "scratch", ClassStatus.PROPOSED).id
    with pytest.raises(IntegrityError):
        with store.session() as session:
            defect_class = session.get(DefectClass, class_id)
            defect_class.status = ClassStatus.CONFIRMED
            decision = record_decision(session, "ana", "confirm", defect_class=defect_class,
                                       before={"status": "proposed"}, after={"status": "confirmed"})
            set_assignments(session, [NewAssignment(region_ids[0], class_id),
                                      NewAssignment(region_ids[1], 999_999)], AssignmentSource.REVIEWER, decision)
            session.flush()
    with store.session() as session:
        assert session.get(DefectClass, class_id).status == ClassStatus.PROPOSED
        assert session.get(DefectClass, class_id).version == 1
        assert session.scalar(select(func.count()).select_from(Decision)) == 0
        assert current_assignments(session) == {}


def test_classes_and_proposals_filter_by_status(store):
    _seed_regions(store)
    with store.session() as session:
        known = add_class(session, "scratch", ClassStatus.KNOWN)
        proposed = add_class(session, "new-1")
        open_proposal = add_proposal(session, proposed, [1], size=3, cohesion=0.7)
        rejected = add_proposal(session, add_class(session, "new-2"), [2], size=2, cohesion=0.4)
        rejected.status = ProposalStatus.REJECTED
    with store.session() as session:
        assert [c.id for c in classes(session, [ClassStatus.KNOWN])] == [known.id]
        assert len(classes(session)) == 3
        assert [p.id for p in proposals(session, [ProposalStatus.OPEN])] == [open_proposal.id]
        assert proposals(session, [ProposalStatus.OPEN])[0].representative_region_ids == [1]


def test_only_one_model_version_is_active(store):
    with store.session() as session:
        first = add_model_version(session, "v1", "/models/v1.safetensors", {"f1": 0.8})
        second = add_model_version(session, "v2", "/models/v2.safetensors", {"f1": 0.9})
    with store.session() as session:
        assert active_model_version(session).name == "v2"
        activate_model_version(session, session.get(ModelVersion, first.id))
    with store.session() as session:
        assert active_model_version(session).name == "v1"
        assert session.get(ModelVersion, second.id).is_active is False
        assert active_model_version(session).metrics == {"f1": 0.8}


def test_sqlite_store_turns_on_foreign_keys_and_wal(tmp_path):
    store = Store(default_database_url(tmp_path / "runs"))
    with store.session() as session:
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    store.dispose()
    assert (tmp_path / "runs" / "adisc.db").is_file()


def test_content_hash_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert content_hash(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_snapshot_transaction_does_not_see_a_write_committed_during_it(store):
    with store.session() as session:
        add_class(session, "before", ClassStatus.KNOWN)
    with store.session() as reader:
        begin_snapshot(reader)
        assert [c.name for c in classes(reader)] == ["before"]
        with store.session() as writer:
            add_class(writer, "during", ClassStatus.KNOWN)
        assert reader.scalar(select(func.count()).select_from(DefectClass)) == 1
    with store.session() as session:
        assert [c.name for c in classes(session)] == ["before", "during"]
