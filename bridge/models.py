"""Records kept in SQL (SQLite by default, PostgreSQL by URL): interactions and the steps a call took."""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
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
    ANSWERED = "answered"        # an agent took the call (queue node)
    CALLBACK = "callback"        # the caller asked to be called back and hung up; the place is kept
    CHAT = "chat"                # the caller took the chat link and hung up; the interaction waits as a chat
    CALLBACK_FAILED = "callback_failed"  # the call back did not reach the customer


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
    # the unified queue (bridge/router.py) and the desktop
    skill: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    answered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    wrapup_code: Mapped[str | None] = mapped_column(String(32), nullable=True)

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


class FollowUpState(enum.StrEnum):
    """Where a follow-up (an SMS or an email in the outbox) stands. Ends: delivered, sent, failed, dead, blocked."""

    PENDING = "pending"        # waiting for its attempt (``next_attempt_at``)
    SENDING = "sending"        # claimed by a dispatcher, not handed to the gateway yet
    HANDING = "handing"        # the gateway may have it (the point of no return is under way)
    VERIFYING = "verifying"    # a dispatcher died while handing it: waiting for the gateway's report
    SENT = "sent"              # the gateway took it (SMS: a delivery report may follow)
    DELIVERED = "delivered"    # the gateway reported delivery
    FAILED = "failed"          # the gateway refused it for good, or reported it undeliverable
    DEAD = "dead"              # out of attempts (dead letter); ``ivr-bridge outbox retry`` sends it again
    BLOCKED = "blocked"        # never sent: refused by a fraud limit or an unusable recipient (``reason``)
    UNCERTAIN = "uncertain"    # the gateway cannot tell whether it took it; not re-sent without an operator


class FollowUp(Base):
    """One message to a customer, written in the transaction of the change that called for it (the outbox)."""

    __tablename__ = "followups"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_followups_idempotency_key"),
        Index("ix_followups_due", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    interaction_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    channel: Mapped[str] = mapped_column(String(8))           # sms | email
    recipient: Mapped[str] = mapped_column(String(254), index=True)   # E.164 or an email address
    purpose: Mapped[str] = mapped_column(String(32))          # in_call, after_call, web, survey ...
    template: Mapped[str] = mapped_column(String(64))
    article_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    language: Mapped[str] = mapped_column(String(8))
    payload: Mapped[dict] = mapped_column(JSON)               # what is sent: {text} or {subject, text, html}
    state: Mapped[str] = mapped_column(String(12), default=FollowUpState.PENDING.value)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)      # why blocked / failed / last error
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    gateway_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Link(Base):
    """A signed link sent to a customer; opening it is recorded and tells the page where it came from."""

    __tablename__ = "links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    interaction_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    followup_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))              # article | survey | help
    target: Mapped[str] = mapped_column(String(64))             # article id, survey name
    language: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    first_opened_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    opens: Mapped[int] = mapped_column(Integer, default=0)


class SurveyAnswer(Base):
    """A one-question survey answer (1-5) given on the phone or on the web."""

    __tablename__ = "survey_answers"
    __table_args__ = (UniqueConstraint("interaction_id", "question", name="uq_survey_answers_question"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    interaction_id: Mapped[str] = mapped_column(String(32), index=True)
    question: Mapped[str] = mapped_column(String(64))
    score: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(8))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QueueEvent(Base):
    """One change of the unified queue, as the router recorded it (bridge/queue_log.py): an interaction joined,
    was offered, accepted, requeued or left; an agent logged in or changed presence."""

    __tablename__ = "queue_events"
    __table_args__ = (Index("ix_queue_events_interaction", "interaction_id", "id"),
                      Index("ix_queue_events_agent", "agent", "id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)   # the Redis stream id: time and order
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(16))       # joined offered accepted requeued left login presence
    interaction_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(String(256), default="")


class Agent(Base):
    """A person who logs in to the desktop: an agent, a supervisor or an admin (bridge/agents.py)."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)          # the login name
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16), default="agent")         # agent | supervisor | admin
    password_hash: Mapped[str] = mapped_column(String(256))                # argon2id, never the password
    skills: Mapped[str] = mapped_column(String(512), default="")           # comma-separated
    voice_capacity: Mapped[int] = mapped_column(Integer, default=1)
    chat_capacity: Mapped[int] = mapped_column(Integer, default=4)
    phone: Mapped[str | None] = mapped_column(String(40), nullable=True)   # the PJSIP endpoint that rings
    language: Mapped[str] = mapped_column(String(8), default="en")         # of the desktop: en | zh-CN
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    password_changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ChatMessage(Base):
    """One message of a chat (bridge/chat.py): numbered per interaction by ``seq`` (1, 2, 3 ... without gaps),
    so a client that saw up to n asks for what came after n. ``client_id`` is the sender's own id for the
    message: a message resent after a reconnect is found by it and not stored twice. The unique constraint on
    (interaction_id, seq) is also the index that reads a chat in order."""

    __tablename__ = "chat_messages"
    __table_args__ = (UniqueConstraint("interaction_id", "seq", name="uq_chat_messages_seq"),
                      UniqueConstraint("interaction_id", "client_id", name="uq_chat_messages_client_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    interaction_id: Mapped[str] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    sender: Mapped[str] = mapped_column(String(8))                          # visitor | agent | system
    agent: Mapped[str | None] = mapped_column(String(64), nullable=True)    # the agent who wrote it
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    text: Mapped[str] = mapped_column(Text)                                 # at most bridge.chat.MAX_TEXT characters
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
