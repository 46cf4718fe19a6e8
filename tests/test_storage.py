"""InteractionStore and the Alembic migrations on SQLite and on PostgreSQL (IVR_TEST_PG_URL, own schema per test).

Without IVR_TEST_PG_URL the PostgreSQL cases fail when CI is set and are skipped otherwise (see conftest.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from bridge import db
from bridge.models import Base, Interaction, Outcome, Step
from bridge.store import InteractionStore, StepRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def _run_sync(url: str, fn: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _schema(conn: Connection) -> dict[str, Any]:
    insp = inspect(conn)
    tables = sorted(t for t in insp.get_table_names())
    return {
        "tables": tables,
        "columns": {t: sorted(c["name"] for c in insp.get_columns(t)) for t in tables},
        "indexes": {t: sorted(i["name"] for i in insp.get_indexes(t) if i["name"]) for t in tables},
        "version": conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all(),
    }


def _diff_against_models(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_upgrade_creates_the_schema_and_is_idempotent(db_url: str) -> None:
    head = ScriptDirectory.from_config(db._alembic_config()).get_current_head()
    await db.upgrade(db_url)
    first = await _run_sync(db_url, _schema)
    assert first["tables"] == ["agents", "alembic_version", "chat_messages", "followups", "interaction_steps",
                               "interactions", "links", "queue_events", "survey_answers"]
    assert first["version"] == [head]
    assert "ix_interactions_asterisk_uniqueid" in first["indexes"]["interactions"]
    assert "ix_interaction_steps_interaction_id" in first["indexes"]["interaction_steps"]

    store = InteractionStore(db_url)
    await store.start()
    try:
        kept = await store.create(caller="+8613800138000", dialled="100", asterisk_uniqueid="1700000000.1")
    finally:
        await store.aclose()

    await db.upgrade(db_url)  # again: nothing to do, nothing lost
    assert await _run_sync(db_url, _schema) == first
    store = InteractionStore(db_url)
    await store.start()
    try:
        again = await store.get(kept.id)
        assert again is not None and again.caller == "+8613800138000"
    finally:
        await store.aclose()


async def test_migrated_schema_matches_the_models(db_url: str) -> None:
    await db.upgrade(db_url)
    assert await _run_sync(db_url, _diff_against_models) == []


async def test_create_steps_finish_and_read_back(store: InteractionStore) -> None:
    record = await store.create(caller="5551234", dialled="200", flow="it_main", language="en",
                                asterisk_channel="PJSIP/hotline-trunk-00000001", asterisk_uniqueid="1700000000.7",
                                sip_call_id="abc@127.0.0.1")
    assert len(record.id) == 32
    assert (record.channel, record.state, record.outcome) == ("voice", "ivr", None)

    await store.add_steps(record.id, 0, [StepRecord("welcome", "enter"), StepRecord("main", "enter")])
    await store.add_steps(record.id, 2, [StepRecord("main", "chose", "1"), StepRecord("main", "set", "intent=x")])
    await store.add_steps(record.id, 4, [])  # nothing to add is fine
    open_record = await store.get(record.id)
    assert open_record is not None and open_record.outcome is None and open_record.ended_at is None
    assert [(s.seq, s.node, s.event, s.value) for s in open_record.steps] == [
        (0, "welcome", "enter", None), (1, "main", "enter", None), (2, "main", "chose", "1"),
        (3, "main", "set", "intent=x")]

    await store.finish(record.id, Outcome.TRANSFERRED, "agent", "operator", language="zh-CN", intent="billing")
    done = await store.get(record.id)
    assert done is not None
    assert (done.outcome, done.outcome_node, done.destination, done.state) == ("transferred", "agent", "operator",
                                                                               "ended")
    assert (done.language, done.intent, done.caller, done.dialled) == ("zh-CN", "billing", "5551234", "200")
    assert done.ended_at is not None and done.started_at is not None
    assert _aware(done.ended_at) >= _aware(done.started_at)
    assert len(done.steps) == 4

    found = await store.find_by_uniqueid("1700000000.7")
    assert found is not None and found.id == record.id and len(found.steps) == 4
    assert await store.find_by_uniqueid("no-such-uniqueid") is None
    assert await store.get("0" * 32) is None
    await store.finish("0" * 32, Outcome.FAILED, None)  # an unknown id is ignored


async def test_find_by_uniqueid_takes_the_newest_and_recent_orders_by_start(store: InteractionStore) -> None:
    ids = []
    for n in range(4):
        record = await store.create(caller=f"55500{n}", dialled="200",
                                    asterisk_uniqueid="shared" if n in (1, 2) else f"own-{n}")
        ids.append(record.id)
        await asyncio.sleep(0.01)  # distinct start times
    newest_shared = await store.find_by_uniqueid("shared")
    assert newest_shared is not None and newest_shared.id == ids[2]
    assert [r.id for r in await store.recent(3)] == [ids[3], ids[2], ids[1]]
    assert [r.id for r in await store.recent()] == ids[::-1]


async def test_deleting_an_interaction_deletes_its_steps(store: InteractionStore) -> None:
    record = await store.create(caller="anonymous", dialled="")
    await store.add_steps(record.id, 0, [StepRecord("welcome", "enter")])
    async with store._maker().begin() as session:
        await session.delete(await session.get(Interaction, record.id))
    async with store._maker()() as session:
        left = (await session.execute(select(Step).where(Step.interaction_id == record.id))).scalars().all()
    assert left == []


async def test_steps_keep_their_given_times(store: InteractionStore) -> None:
    record = await store.create(caller="5551234", dialled="200")
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    await store.add_steps(record.id, 0, [StepRecord("welcome", "enter", at=at)])
    got = await store.get(record.id)
    assert got is not None
    assert _aware(got.steps[0].at) == at


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands DateTime(timezone=True) back naive (stored as UTC); PostgreSQL hands it back aware."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
