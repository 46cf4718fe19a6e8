"""Async storage for interaction records (SQLAlchemy 2; SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from bridge.models import Interaction, Outcome, Step, utcnow


@dataclass(frozen=True)
class StepRecord:
    node: str
    event: str
    value: str | None = None
    at: dt.datetime | None = None


class InteractionStore:
    """Creates interactions, appends their steps and closes them with an outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine | None = None
        self.sessions: async_sessionmaker | None = None

    async def start(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_async_engine(self.url, pool_pre_ping=True)
        if self.url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def _maker(self) -> async_sessionmaker:
        if self.sessions is None:
            raise RuntimeError("InteractionStore.start() was not called")
        return self.sessions

    async def create(self, **fields: object) -> Interaction:
        async with self._maker().begin() as session:
            record = Interaction(**fields)
            session.add(record)
        return record

    async def update(self, interaction_id: str, **fields: object) -> None:
        async with self._maker().begin() as session:
            record = await session.get(Interaction, interaction_id)
            if record is not None:
                for key, value in fields.items():
                    setattr(record, key, value)

    async def add_steps(self, interaction_id: str, first_seq: int, steps: Sequence[StepRecord]) -> None:
        if not steps:
            return
        async with self._maker().begin() as session:
            session.add_all(Step(interaction_id=interaction_id, seq=first_seq + i, node=s.node, event=s.event,
                                 value=s.value, at=s.at or utcnow()) for i, s in enumerate(steps))

    async def finish(self, interaction_id: str, outcome: Outcome, node: str | None,
                     destination: str | None = None, **fields: object) -> None:
        await self.update(interaction_id, outcome=outcome.value, outcome_node=node, destination=destination,
                          ended_at=utcnow(), state="ended", **fields)

    async def get(self, interaction_id: str) -> Interaction | None:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .where(Interaction.id == interaction_id))
            return result.scalar_one_or_none()

    async def find_by_uniqueid(self, uniqueid: str) -> Interaction | None:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .where(Interaction.asterisk_uniqueid == uniqueid)
                                           .order_by(Interaction.started_at.desc()).limit(1))
            return result.scalar_one_or_none()

    async def recent(self, limit: int = 20) -> list[Interaction]:
        async with self._maker()() as session:
            result = await session.execute(select(Interaction).options(selectinload(Interaction.steps))
                                           .order_by(Interaction.started_at.desc()).limit(limit))
            return list(result.scalars())


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()

