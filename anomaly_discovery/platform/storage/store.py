"""The review store (issue 6 item 1): engine and sessions, Alembic upgrades, optimistic locking, and small
repository primitives. Models live in ``store_models.py``.

Every helper takes the ``Session`` of the caller's transaction and only flushes, so a change and the
``Decision`` that audits it commit or roll back together::

    store = Store("sqlite:///runs/adisc.db")           # upgrades the schema to the newest migration
    with store.session() as session:                    # commits on success, rolls back on any error
        proposal = session.get(Proposal, proposal_id)
        expect_version(proposal, version_seen_by_reviewer)
        proposal.status = ProposalStatus.CONFIRMED
        record_decision(session, "ana", "confirm", proposal=proposal, before=..., after=...)

A write that loses a race on a ``classes`` or ``proposals`` row raises ``ConflictError`` naming the row and
both versions; its whole transaction is rolled back. Business rules (confirm, merge, split, undo) belong to
``platform/review/loop.py``, not here.

SQLite note: with pysqlite's default transaction handling a session's reads before its first write see the
latest commit, and the write lock is taken at the first INSERT/UPDATE/DELETE (waiting up to 30 s for another
writer); the version check on UPDATE is what keeps two reviewers from both winning, on SQLite and PostgreSQL.
Bulk helpers (``add_images``, ``add_regions``, ``set_assignments``) use Core INSERT/UPDATE and return ids, not
ORM objects, so 100k rows stay fast.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, create_engine, event, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from anomaly_discovery.platform.storage.models import (Assignment, AssignmentSource, ClassStatus, Dataset, Decision,
                                                       DefectClass, Image, ModelVersion, Product, Proposal,
                                                       ProposalStatus, Region, utc_now)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSIONED = (DefectClass, Proposal)
SQLITE_BUSY_TIMEOUT_S = 30.0
CHUNK = 10_000
MIGRATION_LOCK_KEY = 0x61646973  # 'adis'


class ConflictError(RuntimeError):
    """A row changed since this session (or a client) read it: the write lost the optimistic-lock race."""

    def __init__(self, entity: str, entity_id: int, expected_version: int | None, current_version: int | None):
        self.entity, self.entity_id = entity, entity_id
        self.expected_version, self.current_version = expected_version, current_version
        now = "it no longer exists" if current_version is None else f"the store now holds version {current_version}"
        super().__init__(f"{entity} {entity_id} was changed by someone else: expected version {expected_version}, "
                         f"{now}; reload it and try again (nothing was written)")


def default_database_url(directory: str | Path) -> str:
    """``sqlite:///<directory>/adisc.db`` (the directory is created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(directory / 'adisc.db').resolve()}"


def _entity_name(model: type) -> str:
    return {DefectClass: "class", Proposal: "proposal"}.get(model, model.__name__.lower())


def expect_version(obj: DefectClass | Proposal, expected: int) -> None:
    """Raise ``ConflictError`` when a client acts on ``obj`` as of a version that is no longer current."""
    if obj.version != expected:
        raise ConflictError(_entity_name(type(obj)), obj.id, expected, obj.version)


def make_engine(url: str, echo: bool = False) -> Engine:
    """``create_engine`` plus, for SQLite, foreign keys ON, a 30 s busy timeout and WAL for files."""
    engine = create_engine(url, echo=echo)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if engine.url.database not in (None, "", ":memory:"):
                _enable_wal(cursor)
            cursor.close()
    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch a file database to WAL. SQLite answers ``database is locked`` at once, without its busy handler,
    when several connections make that switch together, so retry until the busy timeout runs out."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def upgrade_database(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Run the Alembic migrations in ``platform/storage/migrations`` up to ``revision`` (no alembic.ini needed).

    Concurrent callers (several replicas starting at once) are serialised: a transaction-scoped advisory lock
    on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite; the later ones find the schema current and do nothing.
    """
    from alembic import command
    from alembic.config import Config

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            elif engine.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


class Store:
    """Engine + session factory for one database URL (any SQLAlchemy URL; SQLite gets foreign keys and WAL).

    ``upgrade=True`` brings the schema to the newest migration first.
    """

    def __init__(self, url: str, *, upgrade: bool = True, echo: bool = False):
        self.url = url
        self.engine = make_engine(url, echo=echo)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self.sessionmaker, "before_flush", _remember_versions)
        if upgrade:
            upgrade_database(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit when the block ends, roll back on any exception (``ConflictError`` for a
        lost optimistic-lock race)."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except StaleDataError as exc:
            session.rollback()
            conflict = self._conflict(session)
            if conflict is None:
                raise
            raise conflict from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _conflict(self, session: Session) -> ConflictError | None:
        """Name the versioned row whose stored version no longer matches what the failed flush expected."""
        with self.engine.connect() as connection:
            for model, entity_id, expected in session.info.get("versions_read", []):
                current = connection.execute(select(model.version).where(model.id == entity_id)).scalar()
                if current != expected:
                    return ConflictError(_entity_name(model), entity_id, expected, current)
        return None

    def dispose(self) -> None:
        self.engine.dispose()


def _remember_versions(session: Session, _context: Any, _instances: Any) -> None:
    """Before each flush, note (model, id, version read) of every versioned row about to be updated/deleted."""
    session.info["versions_read"] = [
        (type(obj), obj.id, obj.version) for obj in (*session.dirty, *session.deleted)
        if isinstance(obj, VERSIONED) and obj.id is not None and (obj in session.deleted or session.is_modified(obj))
    ]


def _chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def get_or_create_product(session: Session, name: str) -> Product:
    product = session.scalar(select(Product).where(Product.name == name))
    if product is None:
        product = Product(name=name)
        session.add(product)
        session.flush()
    return product


def get_or_create_dataset(session: Session, product: Product, name: str, root: str | None = None) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.product_id == product.id, Dataset.name == name))
    if dataset is None:
        dataset = Dataset(product_id=product.id, name=name, root=root)
        session.add(dataset)
        session.flush()
    return dataset


@dataclass(frozen=True)
class NewImage:
    """An image to add; ``model_class_id`` the class of the discovery model's image label, if it gave one."""

    path: str
    content_hash: str
    split: str = "test"
    arrived_at: datetime | None = None
    model_class_id: int | None = None


@dataclass(frozen=True)
class NewRegion:
    """A region of image ``image_id``; ``box`` is (x0, y0, x1, y1), x0/y0 inclusive, x1/y1 exclusive."""

    image_id: int
    box: tuple[int, int, int, int]
    anomaly_score: float
    mask_path: str | None = None
    embedding_id: int | None = None


@dataclass(frozen=True)
class NewAssignment:
    """``class_id`` None records an explicit "unassigned"."""

    region_id: int
    class_id: int | None
    confidence: float | None = None


class CurrentAssignment(NamedTuple):
    region_id: int
    class_id: int | None
    source: AssignmentSource
    confidence: float | None
    decision_id: int | None


def _insert_returning_ids(session: Session, model: type, rows: list[dict[str, Any]]) -> list[int]:
    if not rows:
        return []
    statement = insert(model).returning(model.id, sort_by_parameter_order=True)
    return list(session.scalars(statement, rows))


def add_images(session: Session, dataset: Dataset, images: Sequence[NewImage]) -> list[int]:
    """Insert images of ``dataset`` in bulk; returns their ids in input order."""
    now = utc_now()
    rows = [{"dataset_id": dataset.id, "path": str(image.path), "content_hash": image.content_hash,
             "split": image.split, "arrived_at": image.arrived_at or now, "model_class_id": image.model_class_id}
            for image in images]
    return _insert_returning_ids(session, Image, rows)


def add_regions(session: Session, regions: Sequence[NewRegion]) -> list[int]:
    """Insert regions in bulk; returns their ids in input order. Empty boxes are refused."""
    for region in regions:
        x0, y0, x1, y1 = region.box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"region of image {region.image_id} has an empty box {region.box} (need x1 > x0, y1 > y0)")
    now = utc_now()
    rows = [{"image_id": r.image_id, "x0": r.box[0], "y0": r.box[1], "x1": r.box[2], "y1": r.box[3],
             "anomaly_score": float(r.anomaly_score), "mask_path": r.mask_path, "embedding_id": r.embedding_id,
             "created_at": now} for r in regions]
    return _insert_returning_ids(session, Region, rows)


def set_assignments(session: Session, assignments: Sequence[NewAssignment], source: AssignmentSource,
                    decision: Decision | None = None) -> int:
    """Make each given assignment its region's current one; earlier rows stay as history. Returns the count."""
    region_ids = [a.region_id for a in assignments]
    if len(set(region_ids)) != len(region_ids):
        repeated = sorted({r for r in region_ids if region_ids.count(r) > 1})[:10]
        raise ValueError(f"set_assignments got more than one assignment for region(s) {repeated}")
    if decision is not None and decision.id is None:
        session.flush()
    for chunk in _chunks(region_ids):
        session.execute(update(Assignment).where(Assignment.region_id.in_(chunk), Assignment.is_current.is_(True))
                        .values(is_current=False).execution_options(synchronize_session=False))
    now, source = utc_now(), AssignmentSource(source)
    rows = [{"region_id": a.region_id, "class_id": a.class_id, "source": source,
             "confidence": a.confidence, "is_current": True, "created_at": now,
             "decision_id": decision.id if decision is not None else None} for a in assignments]
    if rows:
        session.execute(insert(Assignment), rows)
    return len(rows)


def current_assignments(session: Session, region_ids: Iterable[int] | None = None,
                        class_ids: Iterable[int] | None = None) -> dict[int, CurrentAssignment]:
    """Current assignment of each region (all regions, or only those given / only those in ``class_ids``)."""
    columns = select(Assignment.region_id, Assignment.class_id, Assignment.source, Assignment.confidence,
                     Assignment.decision_id).where(Assignment.is_current.is_(True))
    if class_ids is not None:
        columns = columns.where(Assignment.class_id.in_(list(class_ids)))
    statements = ([columns] if region_ids is None else
                  [columns.where(Assignment.region_id.in_(chunk)) for chunk in _chunks(list(region_ids))])
    return {row.region_id: CurrentAssignment(*row) for statement in statements
            for row in session.execute(statement)}


def assignment_history(session: Session, region_id: int) -> list[Assignment]:
    """Every assignment a region has had, oldest first (the current one last)."""
    return list(session.scalars(select(Assignment).where(Assignment.region_id == region_id)
                                .order_by(Assignment.id)))


def add_class(session: Session, name: str, status: ClassStatus = ClassStatus.PROPOSED,
              parent_id: int | None = None) -> DefectClass:
    defect_class = DefectClass(name=name, status=ClassStatus(status), parent_id=parent_id)
    session.add(defect_class)
    session.flush()
    return defect_class


def known_class_id(session: Session, name: str) -> int:
    """The id of the known or confirmed class ``name``, created as a known class when there is none."""
    existing = session.scalar(select(DefectClass.id).where(
        DefectClass.name == name, DefectClass.status.in_((ClassStatus.KNOWN, ClassStatus.CONFIRMED))))
    if existing is not None:
        return existing
    return add_class(session, name, ClassStatus.KNOWN).id


def classes(session: Session, statuses: Iterable[ClassStatus] | None = None) -> list[DefectClass]:
    """Classes ordered by id, optionally only those with one of ``statuses``."""
    statement = select(DefectClass).order_by(DefectClass.id)
    if statuses is not None:
        statement = statement.where(DefectClass.status.in_([ClassStatus(s) for s in statuses]))
    return list(session.scalars(statement))


def add_proposal(session: Session, defect_class: DefectClass, representative_region_ids: Sequence[int],
                 size: int, cohesion: float, model_version: ModelVersion | None = None) -> Proposal:
    if size < 1:
        raise ValueError(f"a proposal needs size >= 1 regions, got {size}")
    proposal = Proposal(class_id=defect_class.id, status=ProposalStatus.OPEN, size=int(size),
                        cohesion=float(cohesion), representative_region_ids=[int(r) for r in representative_region_ids],
                        model_version_id=model_version.id if model_version is not None else None)
    session.add(proposal)
    session.flush()
    return proposal


def proposals(session: Session, statuses: Iterable[ProposalStatus] | None = None) -> list[Proposal]:
    """Proposals ordered by id, optionally only those with one of ``statuses``."""
    statement = select(Proposal).order_by(Proposal.id)
    if statuses is not None:
        statement = statement.where(Proposal.status.in_([ProposalStatus(s) for s in statuses]))
    return list(session.scalars(statement))


def record_decision(session: Session, reviewer: str, action: str, *, before: Mapping[str, Any] | None = None,
                    after: Mapping[str, Any] | None = None, proposal: Proposal | None = None,
                    defect_class: DefectClass | None = None, reverts: Decision | None = None) -> Decision:
    """Add an audit row in the caller's transaction (so it commits or rolls back with the change it records)."""
    if not reviewer or not action:
        raise ValueError(f"a decision needs a reviewer and an action, got reviewer={reviewer!r} action={action!r}")
    decision = Decision(reviewer=reviewer, action=action, before=dict(before) if before is not None else None,
                        after=dict(after) if after is not None else None,
                        proposal_id=proposal.id if proposal is not None else None,
                        class_id=defect_class.id if defect_class is not None else None,
                        reverts_id=reverts.id if reverts is not None else None)
    session.add(decision)
    session.flush()
    return decision


def begin_snapshot(session: Session) -> None:
    """Make the rest of this transaction read one consistent state of the store, whatever writers commit
    meanwhile (exports and reports): ``BEGIN`` on SQLite (WAL keeps the snapshot of the first read),
    ``REPEATABLE READ, READ ONLY`` on PostgreSQL. Call it before the transaction's first statement."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    elif dialect == "sqlite":
        session.connection().exec_driver_sql("BEGIN")


def decisions(session: Session, limit: int | None = None) -> list[Decision]:
    """Decisions newest first."""
    return list(session.scalars(select(Decision).order_by(Decision.id.desc()).limit(limit)))


def add_model_version(session: Session, name: str, artifact_path: str, metrics: Mapping[str, Any] | None = None,
                      activate: bool = True) -> ModelVersion:
    model_version = ModelVersion(name=name, artifact_path=artifact_path, metrics=dict(metrics or {}))
    session.add(model_version)
    session.flush()
    if activate:
        activate_model_version(session, model_version)
    return model_version


def activate_model_version(session: Session, model_version: ModelVersion) -> None:
    """Make ``model_version`` the only active one."""
    session.execute(update(ModelVersion).where(ModelVersion.is_active.is_(True), ModelVersion.id != model_version.id)
                    .values(is_active=False).execution_options(synchronize_session="fetch"))
    model_version.is_active = True
    session.flush()


def active_model_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
