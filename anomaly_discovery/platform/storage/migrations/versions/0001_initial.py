"""Initial schema of the review store: products, datasets, images, regions, classes, proposals, decisions,
assignments, model versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _status(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True)


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"),
                                   ondelete=ondelete)


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns), unique=False)


def _partial_unique(name: str, table: str, column: str, flag: str) -> None:
    op.create_index(name, table, [column], unique=True, sqlite_where=sa.text(f"{flag} = 1"),
                    postgresql_where=sa.text(flag))


def upgrade() -> None:
    op.create_table(
        "classes", _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", _status("class_status", "known", "proposed", "confirmed", "rejected", "merged"),
                  nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _fk("classes", "merged_into_id", "classes", "SET NULL"),
        _fk("classes", "parent_id", "classes", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_classes")),
    )
    _index("classes", "name")
    _index("classes", "status")

    op.create_table(
        "model_versions", _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("artifact_path", sa.String(2048), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("is_active", sa.Boolean(create_constraint=True, name="is_active_bool"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_model_versions_name")),
    )
    _partial_unique("uq_model_versions_one_active", "model_versions", "is_active", "is_active")

    op.create_table(
        "products", _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
        sa.UniqueConstraint("name", name=op.f("uq_products_name")),
    )

    op.create_table(
        "datasets", _id(),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("root", sa.String(2048), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _fk("datasets", "product_id", "products", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("product_id", "name", name=op.f("uq_datasets_product_id_name")),
    )
    _index("datasets", "product_id")

    op.create_table(
        "proposals", _id(),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("status", _status("proposal_status", "open", "confirmed", "rejected", "superseded"),
                  nullable=False),
        sa.Column("representative_region_ids", sa.JSON(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("cohesion", sa.Float(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _fk("proposals", "class_id", "classes", "CASCADE"),
        _fk("proposals", "model_version_id", "model_versions", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proposals")),
    )
    _index("proposals", "class_id")
    _index("proposals", "status")

    op.create_table(
        "decisions", _id(),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("proposal_id", sa.Integer(), nullable=True),
        sa.Column("class_id", sa.Integer(), nullable=True),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("reverts_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _fk("decisions", "class_id", "classes", "SET NULL"),
        _fk("decisions", "proposal_id", "proposals", "SET NULL"),
        _fk("decisions", "reverts_id", "decisions", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
        sa.UniqueConstraint("reverts_id", name=op.f("uq_decisions_reverts_id")),
    )
    for column in ("action", "class_id", "created_at", "proposal_id"):
        _index("decisions", column)

    op.create_table(
        "images", _id(),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("split", sa.String(32), nullable=False),
        sa.Column("arrived_at", TIMESTAMP, nullable=False),
        _fk("images", "dataset_id", "datasets", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("dataset_id", "path", name=op.f("uq_images_dataset_id_path")),
    )
    for column in ("arrived_at", "content_hash", "dataset_id"):
        _index("images", column)

    op.create_table(
        "regions", _id(),
        sa.Column("image_id", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in ("x0", "y0", "x1", "y1")),
        sa.Column("mask_path", sa.String(2048), nullable=True),
        sa.Column("anomaly_score", sa.Float(), nullable=False),
        sa.Column("embedding_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint("x1 > x0 AND y1 > y0", name=op.f("ck_regions_box_not_empty")),
        _fk("regions", "image_id", "images", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_regions")),
        sa.UniqueConstraint("embedding_id", name=op.f("uq_regions_embedding_id")),
    )
    _index("regions", "image_id")

    op.create_table(
        "assignments", _id(),
        sa.Column("region_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=True),
        sa.Column("source", _status("assignment_source", "model", "reviewer"), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("is_current", sa.Boolean(create_constraint=True, name="is_current_bool"), nullable=False),
        sa.Column("decision_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _fk("assignments", "class_id", "classes", "SET NULL"),
        _fk("assignments", "decision_id", "decisions", "SET NULL"),
        _fk("assignments", "region_id", "regions", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
    )
    op.create_index("ix_assignments_class_current", "assignments", ["class_id", "is_current"], unique=False)
    _index("assignments", "decision_id")
    _index("assignments", "region_id")
    _partial_unique("uq_assignments_current_region", "assignments", "region_id", "is_current")


def downgrade() -> None:
    for table in ("assignments", "regions", "images", "decisions", "datasets", "proposals", "products",
                  "model_versions", "classes"):
        op.drop_table(table)
