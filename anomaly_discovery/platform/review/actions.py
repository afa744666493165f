"""Reviewer actions and model proposals as store changes (issue 6 item 3), used by ``loop.DiscoveryLoop``.

Every function here works inside the caller's store transaction through a :class:`ChangeSet`, which snapshots each
class / proposal row before its first change (``before``), bumps its version (so a concurrent writer of the same
row loses with ``ConflictError``), collects the new current assignments, refreshes the open proposals whose
members changed, and in ``finish`` writes the assignments and — for a reviewer action — one ``Decision`` with
``before`` / ``after`` payloads::

    {"classes": {id: {name, status, parent_id, merged_into_id, version}},
     "proposals": {id: {status, size, cohesion, representative_region_ids, version}},
     "assignments": {"region_ids": [...], "class_ids": [...], "sources": [...], "confidences": [...]},
     "created_classes": [...], "created_proposals": [...]}            # ("created_*" in ``after`` only)

``undo`` checks that every row still has the version the undone decision left, then restores ``before``: class
and proposal fields, the assignments of every region it changed; classes it created are merged back into their
parent and proposals it created are superseded.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from anomaly_discovery.platform.review.mirror import NO_ID
from anomaly_discovery.platform.review.proposals import (cohesion, group_outliers, prototype, representatives,
                                                         split_members)
from anomaly_discovery.platform.storage.store import (NewAssignment, active_model_version, add_proposal,
                                                      current_assignments, expect_version, record_decision,
                                                      set_assignments)
from anomaly_discovery.platform.storage.models import (AssignmentSource, ClassStatus, Decision, DefectClass, Proposal,
                                                       ProposalStatus, utc_now)
from anomaly_discovery.platform.review.types import ReviewContext

REFERENCE = (ClassStatus.KNOWN, ClassStatus.CONFIRMED)
LIVE = (*REFERENCE, ClassStatus.PROPOSED)
WRITE_LOCK_KEY = 0x6164726C  # 'adrl'
MAX_NAME = 200


class LoopError(Exception):
    """Base of the loop's own errors (the service maps them to 4xx answers)."""


class NotFoundError(LoopError, LookupError):
    """A proposal, class or region id that the store does not hold."""


class InvalidActionError(LoopError, ValueError):
    """An action the current state does not allow (e.g. confirming a rejected proposal)."""


def serialise_writes(session: Session) -> None:
    """Make this transaction the only loop writer until it ends: a PostgreSQL advisory lock, ``BEGIN IMMEDIATE``
    on SQLite. Assignment ids then commit in increasing order, which ``DiscoveryLoop.sync`` relies on."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
    elif dialect == "sqlite":
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def check_name(name: str) -> str:
    cleaned = (name or "").strip()
    if not cleaned or len(cleaned) > MAX_NAME:
        raise InvalidActionError(f"a class name must have 1 to {MAX_NAME} characters, got {name!r}")
    return cleaned


def _class_snapshot(row: DefectClass) -> dict:
    return {"name": row.name, "status": ClassStatus(row.status).value, "parent_id": row.parent_id,
            "merged_into_id": row.merged_into_id, "version": row.version}


def _proposal_snapshot(row: Proposal) -> dict:
    return {"status": ProposalStatus(row.status).value, "size": row.size, "cohesion": row.cohesion,
            "representative_region_ids": list(row.representative_region_ids), "version": row.version}


def assignments_payload(rows: list[tuple[int, int | None, str, float | None]]) -> dict:
    """Column-wise JSON of (region, class, source, confidence) rows: compact for thousands of regions."""
    return {"region_ids": [int(r[0]) for r in rows], "class_ids": [None if r[1] is None else int(r[1]) for r in rows],
            "sources": [AssignmentSource(r[2]).value for r in rows],
            "confidences": [None if r[3] is None else float(r[3]) for r in rows]}


class ChangeSet:
    """The changes of one transaction; see the module docstring."""

    def __init__(self, context: ReviewContext, session: Session):
        self.context, self.session = context, session
        self.class_rows: dict[int, DefectClass] = {}
        self.class_before: dict[str, dict] = {}
        self.proposal_rows: dict[int, Proposal] = {}
        self.proposal_before: dict[str, dict] = {}
        self.created_classes: list[DefectClass] = []
        self.created_proposals: list[Proposal] = []
        self.assigned: dict[int, tuple[int | None, AssignmentSource, float | None]] = {}
        self.new_embeddings: dict[int, int] = {}
        self.stale_proposals: set[int] = set()
        self.proposal: Proposal | None = None
        self.defect_class: DefectClass | None = None
        self.reverts: Decision | None = None

    # -------------------------------------------------------------- rows
    def get_class(self, class_id: int, expected_version: int | None = None,
                  statuses: Iterable[ClassStatus] | None = LIVE) -> DefectClass:
        row = self.session.get(DefectClass, int(class_id))
        if row is None:
            raise NotFoundError(f"class {class_id} does not exist")
        if expected_version is not None:
            expect_version(row, expected_version)
        if statuses is not None and row.status not in tuple(statuses):
            raise InvalidActionError(f"class {class_id} ({row.name!r}) is {ClassStatus(row.status).value}; this "
                                     f"action needs one that is {', '.join(s.value for s in statuses)}")
        self.touch_class(row)
        return row

    def touch_class(self, row: DefectClass) -> None:
        if row.id not in self.class_rows:
            self.class_rows[row.id], self.class_before[str(row.id)] = row, _class_snapshot(row)
        row.updated_at = utc_now()
        self.stale_proposals.add(row.id)

    def get_proposal(self, proposal_id: int, expected_version: int | None = None) -> Proposal:
        row = self.session.get(Proposal, int(proposal_id))
        if row is None:
            raise NotFoundError(f"proposal {proposal_id} does not exist")
        if expected_version is not None:
            expect_version(row, expected_version)
        self.touch_proposal(row)
        return row

    def touch_proposal(self, row: Proposal) -> None:
        if row.id not in self.proposal_rows:
            self.proposal_rows[row.id], self.proposal_before[str(row.id)] = row, _proposal_snapshot(row)
        row.updated_at = utc_now()

    def open_proposal(self, class_id: int) -> Proposal | None:
        return self.session.scalar(select(Proposal).where(Proposal.class_id == class_id,
                                                          Proposal.status == ProposalStatus.OPEN))

    def add_class(self, name: str, status: ClassStatus, parent_id: int | None = None) -> DefectClass:
        row = DefectClass(name=name, status=status, parent_id=parent_id)
        self.session.add(row)
        self.session.flush()
        self.created_classes.append(row)
        return row

    def add_proposal(self, row: DefectClass, region_ids: np.ndarray) -> Proposal:
        vectors, centre = self.member_vectors(region_ids)
        model = active_model_version(self.session)
        proposal = add_proposal(self.session, row, representatives(vectors, centre, region_ids,
                                                                   self.context.config.proposals.n_representatives),
                                len(region_ids), cohesion(vectors, centre), model)
        self.created_proposals.append(proposal)
        return proposal

    # -------------------------------------------------------------- assignments
    def register_regions(self, region_ids: list[int], embedding_ids: np.ndarray) -> None:
        """Regions inserted in this transaction (not yet in the loop's mirror)."""
        self.new_embeddings.update(zip((int(r) for r in region_ids), (int(e) for e in embedding_ids)))

    def assign(self, region_ids: Iterable[int], class_id: int | None, source: AssignmentSource,
               confidence: float | None = None) -> None:
        mirror = self.context.mirror
        for region_id in region_ids:
            region_id = int(region_id)
            if region_id not in self.new_embeddings and region_id < len(mirror.class_id):
                old = int(mirror.class_id[region_id])
                if old != NO_ID:
                    self.stale_proposals.add(old)
            self.assigned[region_id] = (class_id, source, confidence)
        if class_id is not None:
            self.stale_proposals.add(int(class_id))

    def members(self, class_id: int) -> np.ndarray:
        """Region ids of ``class_id`` once this change set is applied."""
        base = self.context.mirror.members(class_id)
        if self.assigned:
            changed = np.fromiter(self.assigned, np.int64, len(self.assigned))
            base = base[~np.isin(base, changed)]
            added = [r for r, (c, _, _) in self.assigned.items() if c == class_id]
            base = np.concatenate([base, np.asarray(added, np.int64)])
        return np.sort(base)

    def embedding_ids(self, region_ids: np.ndarray) -> np.ndarray:
        mirror = self.context.mirror
        return np.array([self.new_embeddings[int(r)] if int(r) in self.new_embeddings else mirror.embedding_id[r]
                         for r in region_ids], np.int64) if self.new_embeddings else mirror.embedding_id[region_ids]

    def member_vectors(self, region_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.context.embeddings.get(self.embedding_ids(region_ids))
        return vectors, prototype(vectors)

    def relabel_unknowns(self, class_ids: Iterable[int]) -> None:
        """Give unknown model-labelled regions to any of ``class_ids`` (known/confirmed after this change) whose
        new prototype lies within the prototype threshold (the proposal cut before one is fitted)."""
        rows = [self.class_rows.get(c) or self.session.get(DefectClass, c) for c in class_ids]
        centres, ids = [], []
        for row in rows:
            if row is not None and row.status in REFERENCE:
                members = self.members(row.id)
                if members.size:
                    centres.append(self.member_vectors(members)[1])
                    ids.append(row.id)
        unknown = self.context.mirror.unknown()
        if self.assigned:
            unknown = unknown[~np.isin(unknown, np.fromiter(self.assigned, np.int64, len(self.assigned)))]
        if not centres or not unknown.size:
            return
        cut = self.context.near_radius()
        similarity = self.context.embeddings.get(self.context.mirror.embedding_id[unknown]) @ np.stack(centres).T
        best = similarity.argmax(axis=1)
        best_similarity = similarity[np.arange(len(unknown)), best]
        for i in np.flatnonzero(1.0 - best_similarity <= cut):
            self.assign([unknown[i]], ids[best[i]], AssignmentSource.MODEL, float(best_similarity[i]))

    # -------------------------------------------------------------- finish
    def _refresh_proposals(self) -> None:
        created = {p.class_id for p in self.created_proposals}
        for class_id in sorted(self.stale_proposals - created):
            row = self.class_rows.get(class_id) or self.session.get(DefectClass, class_id)
            proposal = self.open_proposal(class_id) if row is not None else None
            if proposal is None or row.status != ClassStatus.PROPOSED:
                continue
            members = self.members(class_id)
            self.touch_proposal(proposal)
            if members.size == 0:
                self.touch_class(row)
                proposal.status, row.status = ProposalStatus.SUPERSEDED, ClassStatus.REJECTED
                continue
            vectors, centre = self.member_vectors(members)
            proposal.size, proposal.cohesion = int(members.size), cohesion(vectors, centre)
            proposal.representative_region_ids = representatives(vectors, centre, members,
                                                                  self.context.config.proposals.n_representatives)

    def finish(self, action: str | None = None, reviewer: str | None = None) -> Decision | None:
        """Refresh proposals, flush, then write the assignments (and, for an action, its ``Decision``)."""
        self._refresh_proposals()
        rows = sorted(self.assigned.items())
        before = None
        if action is not None:
            current = current_assignments(self.session, [r for r, _ in rows])
            before = {"classes": self.class_before, "proposals": self.proposal_before,
                      "assignments": assignments_payload([
                          (r, current[r].class_id, current[r].source, current[r].confidence) if r in current
                          else (r, None, AssignmentSource.MODEL, None) for r, _ in rows])}
        self.session.flush()
        decision = None
        if action is not None:
            for row in self.created_classes:
                self.class_rows.setdefault(row.id, row)
            for row in self.created_proposals:
                self.proposal_rows.setdefault(row.id, row)
            after = {"classes": {str(i): _class_snapshot(r) for i, r in self.class_rows.items()},
                     "proposals": {str(i): _proposal_snapshot(r) for i, r in self.proposal_rows.items()},
                     "assignments": assignments_payload([(r, c, s, f) for r, (c, s, f) in rows]),
                     "created_classes": [r.id for r in self.created_classes],
                     "created_proposals": [r.id for r in self.created_proposals]}
            decision = record_decision(self.session, reviewer, action, before=before, after=after,
                                       proposal=self.proposal, defect_class=self.defect_class, reverts=self.reverts)
        for source in AssignmentSource:
            group = [NewAssignment(r, c, f) for r, (c, s, f) in rows if s == source]
            if group:
                set_assignments(self.session, group, source, decision)
        return decision


# ------------------------------------------------------------------ reviewer actions
def _name_free(change: ChangeSet, name: str, own_id: int | None) -> str:
    name = check_name(name)
    clash = change.session.scalar(select(DefectClass.id).where(DefectClass.name == name,
                                                                DefectClass.status.in_(REFERENCE)))
    if clash is not None and clash != own_id:
        raise InvalidActionError(f"class name {name!r} is already used by class {clash}: merge into it instead")
    return name


def confirm(change: ChangeSet, proposal_id: int, name: str, expected_version: int | None) -> None:
    """An open proposal becomes a confirmed class named ``name``; its members are confirmed by the reviewer."""
    proposal = change.get_proposal(proposal_id, expected_version)
    if proposal.status != ProposalStatus.OPEN:
        raise InvalidActionError(f"proposal {proposal_id} is {ProposalStatus(proposal.status).value}; only an open "
                                 "proposal can be confirmed")
    row = change.get_class(proposal.class_id, statuses=(ClassStatus.PROPOSED,))
    row.name, row.status = _name_free(change, name, row.id), ClassStatus.CONFIRMED
    proposal.status = ProposalStatus.CONFIRMED
    change.assign(change.members(row.id), row.id, AssignmentSource.REVIEWER, 1.0)
    change.relabel_unknowns([row.id])
    change.proposal, change.defect_class = proposal, row


def reject(change: ChangeSet, proposal_id: int, expected_version: int | None) -> None:
    """An open proposal and its class are rejected; its members go back to unassigned (by the reviewer, so
    they are not proposed again)."""
    proposal = change.get_proposal(proposal_id, expected_version)
    if proposal.status != ProposalStatus.OPEN:
        raise InvalidActionError(f"proposal {proposal_id} is {ProposalStatus(proposal.status).value}; only an open "
                                 "proposal can be rejected")
    row = change.get_class(proposal.class_id, statuses=(ClassStatus.PROPOSED,))
    change.assign(change.members(row.id), None, AssignmentSource.REVIEWER)
    row.status, proposal.status = ClassStatus.REJECTED, ProposalStatus.REJECTED
    change.proposal, change.defect_class = proposal, row


def rename(change: ChangeSet, class_id: int, name: str, expected_version: int | None) -> None:
    row = change.get_class(class_id, expected_version)
    row.name = _name_free(change, name, row.id) if row.status in REFERENCE else check_name(name)
    change.defect_class = row


def merge(change: ChangeSet, source_id: int, target_id: int, expected_version: int | None,
          target_version: int | None = None) -> None:
    """Class ``source_id`` is merged into ``target_id``: its members move there, its open proposal is
    superseded, and it keeps ``merged_into_id`` for the record."""
    if int(source_id) == int(target_id):
        raise InvalidActionError(f"cannot merge class {source_id} into itself")
    source = change.get_class(source_id, expected_version)
    target = change.get_class(target_id, target_version)
    change.assign(change.members(source.id), target.id, AssignmentSource.REVIEWER, 1.0)
    proposal = change.open_proposal(source.id)
    if proposal is not None:
        change.touch_proposal(proposal)
        proposal.status = ProposalStatus.SUPERSEDED
    source.status, source.merged_into_id = ClassStatus.MERGED, target.id
    change.relabel_unknowns([target.id])
    change.proposal, change.defect_class = proposal, source


def merge_proposal(change: ChangeSet, proposal_id: int, target_id: int, expected_version: int | None,
                   target_version: int | None = None) -> None:
    """An open proposal is folded into an existing class (its class merged there, the proposal superseded)."""
    proposal = change.get_proposal(proposal_id, expected_version)
    if proposal.status != ProposalStatus.OPEN:
        raise InvalidActionError(f"proposal {proposal_id} is {ProposalStatus(proposal.status).value}; only an open "
                                 "proposal can be merged")
    merge(change, proposal.class_id, target_id, None, target_version)


def split(change: ChangeSet, class_id: int, k: int, expected_version: int | None) -> None:
    """k-means splits a class into ``k`` parts: the largest stays, the others become child classes (same
    status; proposals for a proposed class) named ``"<name> (2)"``, ``"<name> (3)"``, ..."""
    row = change.get_class(class_id, expected_version)
    members = change.members(row.id)
    if not 2 <= k <= members.size:
        raise InvalidActionError(f"class {class_id} has {members.size} members: cannot split it into k={k} parts")
    try:
        parts = split_members(change.member_vectors(members)[0], k, seed=change.context.config.seed)
    except ValueError as exc:
        raise InvalidActionError(f"class {class_id}: {exc}") from exc
    status = ClassStatus.CONFIRMED if row.status == ClassStatus.KNOWN else ClassStatus(row.status)
    for part in range(1, k):
        child = change.add_class(check_name(f"{row.name[:MAX_NAME - 6]} ({part + 1})"), status, parent_id=row.id)
        change.assign(members[parts == part], child.id, AssignmentSource.REVIEWER, 1.0)
        if status == ClassStatus.PROPOSED:
            change.add_proposal(child, members[parts == part])
    change.defect_class = row


def move(change: ChangeSet, region_ids: list[int], class_id: int | None, expected_version: int | None) -> None:
    """Reviewer moves single regions to class ``class_id`` (``None``: unassigned)."""
    regions = np.unique(np.asarray(region_ids, np.int64))
    if regions.size == 0:
        raise InvalidActionError("move needs at least one region id")
    missing = regions[~change.context.mirror.exists(regions)]
    if missing.size:
        raise NotFoundError(f"regions {missing[:10].tolist()} do not exist")
    for old in np.unique(change.context.mirror.class_id[regions]):
        if old != NO_ID:
            change.touch_class(change.session.get(DefectClass, int(old)))
    target = change.get_class(class_id, expected_version) if class_id is not None else None
    change.assign(regions, target.id if target else None, AssignmentSource.REVIEWER, 1.0 if target else None)
    change.defect_class = target


def _versions_left(session: Session, target: Decision) -> dict[str, dict[str, int]]:
    """Version of each row of ``target`` as the newest decision touching it left it: the later decisions are
    all undone actions and their undos, so that is the version the row has unless someone else changed it."""
    versions = {kind: {key: snapshot["version"] for key, snapshot in (target.after or {}).get(kind, {}).items()}
                for kind in ("classes", "proposals")}
    for later in session.scalars(select(Decision).where(Decision.id > target.id).order_by(Decision.id)):
        for kind, seen in versions.items():
            for key, snapshot in (later.after or {}).get(kind, {}).items():
                if key in seen:
                    seen[key] = snapshot["version"]
    return versions


def undo(change: ChangeSet) -> None:
    """Revert the newest reviewer decision not yet undone (see the module docstring)."""
    reverted = select(Decision.reverts_id).where(Decision.reverts_id.is_not(None))
    target = change.session.scalar(select(Decision).where(Decision.action != "undo", Decision.id.not_in(reverted))
                                   .order_by(Decision.id.desc()).limit(1))
    if target is None:
        raise InvalidActionError("there is no reviewer action left to undo")
    before, after = target.before or {}, target.after or {}
    versions = _versions_left(change.session, target)
    for key in after.get("classes", {}):
        row = change.get_class(int(key), versions["classes"][key], statuses=None)
        old = before.get("classes", {}).get(key)
        if old is None:
            row.status, row.merged_into_id = ClassStatus.MERGED, row.parent_id
        else:
            row.name, row.status = old["name"], ClassStatus(old["status"])
            row.parent_id, row.merged_into_id = old["parent_id"], old["merged_into_id"]
    for key in after.get("proposals", {}):
        row = change.get_proposal(int(key), versions["proposals"][key])
        old = before.get("proposals", {}).get(key)
        if old is None:
            row.status = ProposalStatus.SUPERSEDED
        else:
            row.status, row.size, row.cohesion = ProposalStatus(old["status"]), old["size"], old["cohesion"]
            row.representative_region_ids = old["representative_region_ids"]
    columns = before.get("assignments", {})
    for region_id, class_id, source, confidence in zip(columns.get("region_ids", []), columns.get("class_ids", []),
                                                       columns.get("sources", []), columns.get("confidences", [])):
        change.assign([region_id], class_id, AssignmentSource(source), confidence)
    change.reverts = target
    change.proposal = change.session.get(Proposal, target.proposal_id) if target.proposal_id else None
    change.defect_class = change.session.get(DefectClass, target.class_id) if target.class_id else None


# ------------------------------------------------------------------ model writes
def propose_rows(change: ChangeSet, unknown: np.ndarray) -> list[int]:
    """Label the unknown regions again; those still unknown are grouped into new proposals. Returns their ids."""
    context = change.context
    vectors = context.embeddings.get(context.mirror.embedding_id[unknown])
    labels = context.label_embeddings(vectors)
    rest = []
    for position, (region_id, label) in enumerate(zip(unknown, labels)):
        if label.kind == "unknown":
            rest.append(position)
        else:
            change.assign([region_id], label.class_id, AssignmentSource.MODEL, label.similarity)
    rest = np.asarray(rest, np.int64)
    for group in group_outliers(vectors[rest], context.proposal_config()) if rest.size else []:
        row = change.add_class("new", ClassStatus.PROPOSED)
        row.name = f"new-{row.id}"
        members = np.sort(unknown[rest[group.rows]])
        change.assign(members, row.id, AssignmentSource.MODEL, group.cohesion)
        change.add_proposal(row, members)
    change.finish()
    return [p.id for p in change.created_proposals]
