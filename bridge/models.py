"""Records kept in SQL (SQLite by default, PostgreSQL by URL): interactions and the steps a call took."""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Outcome(enum.StrEnum):
    """How an interaction ended. ``abandoned`` records the node the caller left at."""

    COMPLETED = "completed"      # the flow reached its end (goodbye, hang-up node)
    TRANSFERRED = "transferred"  # left the flow for a dialplan destination (operator, voicemail, queue)
    ABANDONED = "abandoned"      # the caller hung up inside the flow
    FAILED = "failed"            # ivr-bridge could not run the flow; the call went to the dialplan fallback


class Interaction(Base):
    """One contact on any channel; for voice, one call through the IVR."""

    __tablename__ = "interactions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    channel: Mapped[str] = mapped_column(String(16), default="voice")
    state: Mapped[str] = mapped_column(String(16), default="ivr", index=True)
    caller: Mapped[str] = mapped_column(String(32), index=True)
    dialled: Mapped[str] = mapped_column(String(32), default="")
    flow: Mapped[str] = mapped_column(String(64), default="")
    language: Mapped[str] = mapped_column(String(8), default="")
    intent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    asterisk_channel: Mapped[str] = mapped_column(String(128), default="")
    asterisk_uniqueid: Mapped[str] = mapped_column(String(64), default="", index=True)
    sip_call_id: Mapped[str] = mapped_column(String(128), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    outcome_node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    destination: Mapped[str | None] = mapped_column(String(64), nullable=True)

    steps: Mapped[list[Step]] = relationship(back_populates="interaction", order_by="Step.seq",
                                             cascade="all, delete-orphan")


class Step(Base):
    """One thing that happened in a call: a node entered, a digit chosen, a timeout, a transfer."""

    __tablename__ = "interaction_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    interaction_id: Mapped[str] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    value: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    interaction: Mapped[Interaction] = relationship(back_populates="steps")
