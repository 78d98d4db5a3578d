"""Fine-tuning's tables: the jobs, the checkpointed segments they are billed by, the adapters."""

import uuid
from datetime import datetime

from sqlalchemy import DateTime, Double, ForeignKey, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
ACTIVE = (QUEUED, RUNNING)


class FineTune(Base):
    __tablename__ = "fine_tunes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    # Training settings as asked for (steps, rank, learning_rate, resolution, seed, ...).
    params: Mapped[dict] = mapped_column(JSONB)
    dataset_key: Mapped[str] = mapped_column(Text)
    dataset_images: Mapped[int] = mapped_column(Integer)
    dataset_bytes: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Double)
    # The last checkpoint (a run resumes from it) and what the steps up to it cost.
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_key: Mapped[str | None] = mapped_column(Text)
    gpu_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    adapter_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FineTuneSegment(Base):
    """Steps [from_step, to_step) of a fine-tune and the device time they took: written with
    the checkpoint that keeps them, so a step redone after a lost worker is billed once."""

    __tablename__ = "fine_tune_segments"

    fine_tune_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tunes.id", ondelete="CASCADE"), primary_key=True
    )
    from_step: Mapped[int] = mapped_column(Integer, primary_key=True)
    to_step: Mapped[int] = mapped_column(Integer)
    gpu_seconds: Mapped[float] = mapped_column(Double)
    loss: Mapped[float] = mapped_column(Double)  # mean training loss over these steps
    attempt: Mapped[int] = mapped_column(Integer)


class Adapter(Base):
    """A LoRA adapter a tenant owns, usable by id in image requests."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    fine_tune_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(Text)  # its safetensors file in storage
    size_bytes: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
