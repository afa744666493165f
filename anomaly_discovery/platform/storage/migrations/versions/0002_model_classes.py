"""What a discovery model said, kept beside what reviewers decide: ``model_classes`` maps each novel cluster of
a model version to the class it stands for in the store, and ``images.model_class_id`` is the model's image class.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name=op.f("fk_model_classes_model_version_id_model_versions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["class_id"], ["classes.id"], name=op.f("fk_model_classes_class_id_classes"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_classes")),
        sa.UniqueConstraint("model_version_id", "cluster", name=op.f("uq_model_classes_model_version_id_cluster")),
    )
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("model_class_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f("fk_images_model_class_id_classes"), "classes", ["model_class_id"], ["id"],
                                 ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint(op.f("fk_images_model_class_id_classes"), type_="foreignkey")
        batch.drop_column("model_class_id")
    op.drop_table("model_classes")
