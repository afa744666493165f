"""The review loop on SQLite and PostgreSQL: discovery ingest and proposals, every reviewer action and its undo,
optimistic-locking conflicts, two processes on one store, crash recovery, and arrivals through ``ingest``."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_discovery.platform.review.loop import DiscoveryLoop, InvalidActionError, NotFoundError
from anomaly_discovery.platform.review.types import ArrivedImage, DiscoveredImage, DiscoveredRegion, LoopConfig
from anomaly_discovery.platform.predictor import PredictedImage, PredictedRegion
from anomaly_discovery.platform.storage.store import (ConflictError, Store, classes, current_assignments, decisions,
                                                      proposals)
from anomaly_discovery.platform.storage.models import ClassStatus, Decision

DIM = 32
KNOWN = ("scratch", "dent", "stain")
PER_CLUSTER = 20


@pytest.fixture
def centres() -> np.ndarray:
    """Five well-separated unit directions: three known classes, then two novel kinds."""
    vectors = np.random.default_rng(0).standard_normal((5, DIM))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def near(centre: np.ndarray, n: int, seed: int, noise: float = 0.15) -> np.ndarray:
    return centre + noise * np.random.default_rng(seed).standard_normal((n, DIM))


def discovery_run(centres: np.ndarray) -> tuple[list[DiscoveredImage], list[DiscoveredRegion]]:
    """One region per image, PER_CLUSTER per centre; the model names the known ones."""
    images, regions = [], []
    for c, centre in enumerate(centres):
        for i, embedding in enumerate(near(centre, PER_CLUSTER, seed=c)):
            key = f"c{c}_{i}"
            images.append(DiscoveredImage(key, f"/data/{key}.png", f"hash-{key}"))
            regions.append(DiscoveredRegion(key, (1, 2, 11, 12), 0.8, embedding,
                                            KNOWN[c] if c < len(KNOWN) else None, 0.9 if c < len(KNOWN) else None))
    return images, regions


@pytest.fixture
def loop(database_url, tmp_path, centres) -> DiscoveryLoop:
    loop = DiscoveryLoop(Store(database_url), tmp_path / "state" / "index.npz", DIM)
    loop.ingest_discovery(*discovery_run(centres), KNOWN, model_version="discovery-1")
    yield loop
    loop.close()
    loop.store.dispose()


def class_named(loop: DiscoveryLoop, name: str) -> int:
    return next(c.id for c in loop.classes.values() if c.name == name and c.status != ClassStatus.MERGED)


def live_state(loop: DiscoveryLoop) -> tuple:
    """Everything an action changes, minus versions: live classes, proposals, assignments, index contents."""
    with loop.store.session() as session:
        live = sorted((c.id, c.name, c.status.value) for c in classes(session)
                      if c.status in (ClassStatus.KNOWN, ClassStatus.CONFIRMED, ClassStatus.PROPOSED))
        open_proposals = sorted((p.id, p.status.value, p.size) for p in proposals(session))
        assigned = sorted((r, a.class_id, a.source.value) for r, a in current_assignments(session).items())
    return live, open_proposals, assigned, loop.index.ids("prototype").tolist(), loop.index.ids("region").tolist()


def test_discovery_outliers_become_one_proposal_per_novel_kind(loop):
    open_proposals = loop.list_proposals()
    assert sorted(p.size for p in open_proposals) == [PER_CLUSTER, PER_CLUSTER]
    for proposal in open_proposals:
        members = set(loop.mirror.members(proposal.class_id).tolist())
        assert proposal.cohesion > 0.6
        assert set(proposal.representative_region_ids) <= members
        assert len(proposal.representative_region_ids) == loop.config.proposals.n_representatives
    assert loop.index.count("prototype") == len(KNOWN)
    assert loop.index.count("region") == len(KNOWN) * PER_CLUSTER


def test_confirm_adds_the_class_its_members_and_prototype_to_the_index_and_audits(loop):
    proposal = loop.list_proposals()[0]
    result = loop.confirm(proposal.id, "hole", expected_version=proposal.version, reviewer="ana")
    info = loop.classes[proposal.class_id]
    assert (info.name, info.status) == ("hole", ClassStatus.CONFIRMED)
    assert proposal.class_id in loop.index.ids("prototype")
    assert loop.index.count("region") == (len(KNOWN) + 1) * PER_CLUSTER
    with loop.store.session() as session:
        decision = session.get(Decision, result.decision_id)
        assert (decision.reviewer, decision.action, decision.proposal_id) == ("ana", "confirm", proposal.id)
        assert decision.before["proposals"][str(proposal.id)]["status"] == "open"
        assert decision.after["proposals"][str(proposal.id)]["status"] == "confirmed"
        assert len(decision.after["assignments"]["region_ids"]) == PER_CLUSTER


def test_rejected_regions_are_unassigned_and_never_proposed_again(loop):
    proposal = loop.list_proposals()[0]
    members = loop.mirror.members(proposal.class_id)
    loop.reject(proposal.id, expected_version=proposal.version)
    assert (loop.mirror.class_id[members] == -1).all()
    assert loop.propose() == []
    assert len(loop.list_proposals()) == 1


def test_merge_moves_members_and_drops_the_merged_prototype(loop):
    scratch, dent = class_named(loop, "scratch"), class_named(loop, "dent")
    loop.merge(dent, scratch, expected_version=loop.classes[dent].version)
    assert loop.class_sizes()[scratch] == 2 * PER_CLUSTER
    assert loop.classes[dent].status == ClassStatus.MERGED and loop.classes[dent].merged_into_id == scratch
    assert dent not in loop.index.ids("prototype")
    assert loop.index.count("region") == len(KNOWN) * PER_CLUSTER


def test_split_separates_a_merged_class_back_into_its_two_kinds(loop):
    scratch, dent = class_named(loop, "scratch"), class_named(loop, "dent")
    dent_members = set(loop.mirror.members(dent).tolist())
    loop.merge(dent, scratch)
    loop.split(scratch, 2, expected_version=loop.classes[scratch].version)
    child = next(c for c in loop.classes.values() if c.parent_id == scratch)
    assert child.status == ClassStatus.CONFIRMED and child.name == "scratch (2)"
    parts = [set(loop.mirror.members(scratch).tolist()), set(loop.mirror.members(child.id).tolist())]
    assert dent_members in parts
    assert {scratch, child.id} <= set(loop.index.ids("prototype").tolist())


def test_move_relabels_single_regions_and_updates_both_prototypes(loop):
    scratch, stain = class_named(loop, "scratch"), class_named(loop, "stain")
    before = loop.index.vectors([scratch, stain], kind="prototype")
    moved = loop.mirror.members(scratch)[:3]
    loop.move(moved, stain, expected_version=loop.classes[stain].version)
    assert (loop.mirror.class_id[moved] == stain).all()
    assert loop.class_sizes()[scratch] == PER_CLUSTER - 3
    after = loop.index.vectors([scratch, stain], kind="prototype")
    assert not np.allclose(before, after)


def test_rename_keeps_members_and_refuses_a_name_in_use(loop):
    stain = class_named(loop, "stain")
    loop.rename(stain, "smear")
    assert loop.classes[stain].name == "smear" and loop.class_sizes()[stain] == PER_CLUSTER
    with pytest.raises(InvalidActionError, match="already used"):
        loop.rename(stain, "scratch")


def test_undo_walks_back_every_action_to_the_state_before_it(loop):
    first, second = loop.list_proposals()
    scratch, dent, stain = (class_named(loop, n) for n in KNOWN)
    actions = [lambda: loop.confirm(first.id, "hole"), lambda: loop.reject(second.id),
               lambda: loop.merge(dent, scratch), lambda: loop.split(scratch, 2),
               lambda: loop.move(loop.mirror.members(stain)[:2], first.class_id), lambda: loop.rename(stain, "smear")]
    states = []
    for action in actions:
        states.append(live_state(loop))
        action()
    for expected in reversed(states):
        loop.undo(reviewer="ana")
        assert live_state(loop) == expected
    with pytest.raises(InvalidActionError, match="nothing|no reviewer action"):
        loop.undo()


def test_a_stale_version_is_a_conflict_and_writes_nothing(loop):
    proposal = loop.list_proposals()[0]
    loop.rename(proposal.class_id, "maybe hole")
    state, n_decisions = live_state(loop), len(loop_decisions(loop))
    with pytest.raises(ConflictError, match="expected version"):
        loop.confirm(proposal.id, "hole", expected_version=proposal.version + 5)
    with pytest.raises(ConflictError):
        loop.merge(proposal.class_id, class_named(loop, "scratch"), expected_version=1)
    assert live_state(loop) == state and len(loop_decisions(loop)) == n_decisions


def loop_decisions(loop: DiscoveryLoop) -> list[Decision]:
    with loop.store.session() as session:
        return decisions(session)


def test_two_processes_on_one_store_see_each_other_and_only_one_wins(loop, database_url):
    other = DiscoveryLoop(Store(database_url), loop.index_path, DIM)
    proposal = other.list_proposals()[0]
    loop.confirm(proposal.id, "hole", expected_version=proposal.version)
    with pytest.raises(ConflictError, match=f"proposal {proposal.id}"):
        other.reject(proposal.id, expected_version=proposal.version)
    other.sync()
    assert other.classes[proposal.class_id].status == ClassStatus.CONFIRMED
    assert other.index.ids("region").tolist() == loop.index.ids("region").tolist()
    other.store.dispose()


def test_a_crash_between_commit_and_index_save_is_replayed_on_restart(loop, database_url, monkeypatch):
    loop.close()
    crashing = DiscoveryLoop(Store(database_url), loop.index_path, DIM, LoopConfig(background_save=False))
    proposal = crashing.list_proposals()[0]

    def crash(*args, **kwargs):
        raise SystemExit("killed before the index was written")

    monkeypatch.setattr(crashing.index, "save", crash)
    with pytest.raises(SystemExit):
        crashing.confirm(proposal.id, "hole")
    restarted = DiscoveryLoop(Store(database_url), loop.index_path, DIM)
    assert restarted.recovery == "replayed"
    assert restarted.classes[proposal.class_id].status == ClassStatus.CONFIRMED
    loop.index_path.unlink()
    rebuilt = DiscoveryLoop(Store(database_url), loop.index_path, DIM)
    assert rebuilt.recovery == "rebuilt"
    assert restarted.index.ids("region").tolist() == rebuilt.index.ids("region").tolist()
    ids = rebuilt.index.ids("prototype")
    assert ids.tolist() == restarted.index.ids("prototype").tolist()
    np.testing.assert_allclose(restarted.index.vectors(ids, "prototype"), rebuilt.index.vectors(ids, "prototype"),
                               atol=1e-6)
    assert DiscoveryLoop(Store(database_url), loop.index_path, DIM).recovery == "current"


def test_background_checkpoints_leave_a_current_index_after_close(loop, database_url):
    proposal = loop.list_proposals()[0]
    loop.confirm(proposal.id, "hole")
    loop.rename(proposal.class_id, "pit")
    loop.close()
    reopened = DiscoveryLoop(Store(database_url), loop.index_path, DIM)
    assert reopened.recovery == "current"
    assert reopened.classes[proposal.class_id].name == "pit"
    reopened.close()


def arrival(key: str, embeddings: np.ndarray) -> tuple[ArrivedImage, PredictedImage]:
    regions = [PredictedRegion((0, 0, 4, 4), e / np.linalg.norm(e), 0.9) for e in embeddings]
    return ArrivedImage(f"/arrivals/{key}.png", f"hash-{key}"), PredictedImage(
        0.9, np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), regions)


def test_arrivals_are_labelled_known_new_or_unknown_and_duplicates_are_not_stored_twice(loop, centres):
    far = np.random.default_rng(7).standard_normal(DIM)
    image, prediction = arrival("a", np.stack([near(centres[0], 1, 50)[0], near(centres[3], 1, 51)[0], far]))
    first, again = loop.ingest_predictions([image, image], [prediction, prediction])
    assert [label.kind for label in first.labels] == ["class", "new", "unknown"]
    assert first.labels[0].name == "scratch"
    assert again.duplicate and again.image_id == first.image_id
    n_regions = loop.mirror.count()
    assert loop.ingest_predictions([image], [prediction])[0].duplicate
    assert loop.mirror.count() == n_regions


def test_unknown_arrivals_that_cluster_become_a_new_proposal(loop):
    novel = np.random.default_rng(9).standard_normal(DIM)
    pairs = [arrival(f"n{i}", near(novel, 2, 60 + i, noise=0.1)) for i in range(3)]
    results = loop.ingest_predictions([p[0] for p in pairs], [p[1] for p in pairs])
    assert all(label.kind == "new" for result in results for label in result.labels)
    assert sorted(p.size for p in loop.list_proposals()) == [6, PER_CLUSTER, PER_CLUSTER]


def test_unknown_ids_and_wrong_states_are_named(loop):
    proposal = loop.list_proposals()[0]
    with pytest.raises(NotFoundError, match="proposal 999"):
        loop.confirm(999, "x")
    with pytest.raises(NotFoundError, match="regions"):
        loop.move([123456], class_named(loop, "scratch"))
    loop.reject(proposal.id)
    with pytest.raises(InvalidActionError, match="only an open proposal"):
        loop.confirm(proposal.id, "hole")
    with pytest.raises(InvalidActionError, match="k=50"):
        loop.split(class_named(loop, "scratch"), 50)
    with pytest.raises(InvalidActionError, match="class name"):
        loop.rename(class_named(loop, "scratch"), "   ")


def test_an_embedding_file_of_another_dimension_is_refused(tmp_path, sqlite_url):
    DiscoveryLoop(Store(sqlite_url), tmp_path / "index.npz", DIM)
    with pytest.raises(ValueError, match="32-d"):
        DiscoveryLoop(Store(sqlite_url), tmp_path / "index.npz", DIM * 2, LoopConfig())
