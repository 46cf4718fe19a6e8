"""The command line: the stored path of a call as a person reads it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge import db
from bridge.cli import main
from bridge.models import Outcome
from bridge.store import InteractionStore, StepRecord

pytestmark = pytest.mark.unit


def test_interactions_lists_each_call_with_nodes_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/cli.db"

    async def seed() -> None:
        await db.upgrade(url)
        store = InteractionStore(url)
        await store.start()
        try:
            record = await store.create(caller="13800138000", dialled="100", flow="hotline")
            await store.add_steps(record.id, 0, [
                StepRecord("main", "enter"), StepRecord("main", "no-input"), StepRecord("main", "chose", "2"),
                StepRecord("main", "set", "intent=orders"), StepRecord("orders", "enter"),
                StepRecord("order_number", "enter"), StepRecord("order_number", "collected", "12345"),
                StepRecord("goodbye", "enter"), StepRecord("goodbye", "end", "completed")])
            await store.finish(record.id, Outcome.COMPLETED, "goodbye")
        finally:
            await store.aclose()

    asyncio.run(seed())
    assert main(["interactions", "--set", f"database.url={url}"]) == 0
    line = capsys.readouterr().out.strip()
    assert "13800138000 -> 100" in line and "completed" in line
    assert line.endswith("main[no-input][2] > orders > order_number[12345] > goodbye")
