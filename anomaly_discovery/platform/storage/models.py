"""SQLAlchemy 2.0 ORM models of the review store (issue 6 item 1); the repository API is in ``store.py``.

Tables, created by the Alembic migrations in ``platform/storage/migrations`` (never by ``create_all``):

* ``products`` → ``datasets`` → ``images`` (path, SHA-256 content hash, split, arrival time) → ``regions``
  (box, mask file, anomaly score, ``embedding_id`` = the region's int64 id in the FAISS index).
* ``classes``: defect kinds with a ``ClassStatus``; ``parent_id`` is the class a split came from,
  ``merged_into_id`` the class a merged one now lives in.
* ``assignments``: region → class history; exactly one row per region has ``is_current`` (a partial unique
  index), ``class_id`` NULL there means "explicitly unassigned".
* ``proposals``: a proposed class with representative regions, size and cohesion.
* ``decisions``: the audit trail (reviewer, action, JSON before/after); ``reverts_id`` marks an undo.
* ``model_versions``: artifacts with metrics; at most one ``is_active`` (a partial unique index).
* ``model_classes``: which class each novel cluster of a model version stands for; ``images.model_class_id`` is
  the discovery model's image class (what ``adisc discover`` counts per class), kept as the model said it.

``classes`` and ``proposals`` carry a ``version`` column used as SQLAlchemy's ``version_id_col``: every
UPDATE checks and bumps it, so two sessions that read the same row cannot both write it.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Enum, Float, ForeignKey, Index,
                        Integer, MetaData, String, UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store: pass a timezone-aware one")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class ClassStatus(str, enum.Enum):
    KNOWN = "known"
    PROPOSED = "proposed"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    MERGED = "merged"


class AssignmentSource(str, enum.Enum):
    MODEL = "model"
    REVIEWER = "reviewer"


class ProposalStatus(str, enum.Enum):
    OPEN = "open"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"


def _enum(enum_class: type[enum.Enum], name: str) -> Enum:
    """A VARCHAR + CHECK enum storing the lower-case values (portable, no PostgreSQL TYPE to migrate)."""
    return Enum(enum_class, name=name, native_enum=False, create_constraint=True,
                values_callable=lambda members: [member.value for member in members], validate_strings=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[int]: JSON()}


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("product_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    root: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    product: Mapped[Product] = relationship()


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(2048))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    split: Mapped[str] = mapped_column(String(32))
    arrived_at: Mapped[datetime] = mapped_column(default=utc_now, index=True)
    model_class_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"))

    dataset: Mapped[Dataset] = relationship()


class Region(Base):
    __tablename__ = "regions"
    __table_args__ = (CheckConstraint("x1 > x0 AND y1 > y0", name="box_not_empty"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    x1: Mapped[int] = mapped_column(Integer)
    y1: Mapped[int] = mapped_column(Integer)
    mask_path: Mapped[str | None] = mapped_column(String(2048))
    anomaly_score: Mapped[float] = mapped_column(Float)
    embedding_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    image: Mapped[Image] = relationship()


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (Index("uq_model_versions_one_active", "is_active", unique=True,
                            sqlite_where=text("is_active = 1"), postgresql_where=text("is_active")),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    artifact_path: Mapped[str] = mapped_column(String(2048))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    is_active: Mapped[bool] = mapped_column(Boolean(create_constraint=True, name="is_active_bool"), default=False)


class ModelClass(Base):
    """Novel cluster ``cluster`` of a model version stands for class ``class_id`` (``None``: for none)."""

    __tablename__ = "model_classes"
    __table_args__ = (UniqueConstraint("model_version_id", "cluster"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    cluster: Mapped[int] = mapped_column(Integer)
    class_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"))


class DefectClass(Base):
    __tablename__ = "classes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[ClassStatus] = mapped_column(_enum(ClassStatus, "class_status"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"))
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)
    version: Mapped[int] = mapped_column(Integer)

    parent: Mapped[DefectClass | None] = relationship(foreign_keys=[parent_id], remote_side=[id])
    merged_into: Mapped[DefectClass | None] = relationship(foreign_keys=[merged_into_id], remote_side=[id])

    __mapper_args__ = {"version_id_col": version}


class Proposal(Base):
    __tablename__ = "proposals"

    id: Mapped[int] = mapped_column(primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id", ondelete="CASCADE"), index=True)
    status: Mapped[ProposalStatus] = mapped_column(_enum(ProposalStatus, "proposal_status"), index=True)
    representative_region_ids: Mapped[list[int]] = mapped_column(default=list)
    size: Mapped[int] = mapped_column(Integer)
    cohesion: Mapped[float] = mapped_column(Float)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)
    version: Mapped[int] = mapped_column(Integer)

    defect_class: Mapped[DefectClass] = relationship()

    __mapper_args__ = {"version_id_col": version}


class Decision(Base):
    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(50), index=True)
    proposal_id: Mapped[int | None] = mapped_column(ForeignKey("proposals.id", ondelete="SET NULL"), index=True)
    class_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"), index=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reverts_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id", ondelete="SET NULL"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now, index=True)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        Index("uq_assignments_current_region", "region_id", unique=True,
              sqlite_where=text("is_current = 1"), postgresql_where=text("is_current")),
        Index("ix_assignments_class_current", "class_id", "is_current"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    region_id: Mapped[int] = mapped_column(ForeignKey("regions.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int | None] = mapped_column(ForeignKey("classes.id", ondelete="SET NULL"))
    source: Mapped[AssignmentSource] = mapped_column(_enum(AssignmentSource, "assignment_source"))
    confidence: Mapped[float | None] = mapped_column(Float)
    is_current: Mapped[bool] = mapped_column(Boolean(create_constraint=True, name="is_current_bool"), default=True)
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
