"""Agents of the desktop (bridge/agents.py) on SQLite and PostgreSQL: argon2 hashes, authentication, refused
values, re-hashing, and the ``ivr-bridge agents`` command."""

from __future__ import annotations

import io

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select

from bridge.agents import AgentDirectory, AgentError
from bridge.models import Agent
from bridge.store import InteractionStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
PASSWORD = "correct horse battery"


async def count(store: InteractionStore) -> int:
    assert store.sessions is not None
    async with store.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(Agent))).scalar_one())


async def test_an_agent_logs_in_with_their_password_and_nobody_else_does(store: InteractionStore) -> None:
    directory = AgentDirectory(store)
    await directory.add("ann", PASSWORD, role="supervisor", display_name="安娜", skills=["billing", "tech"],
                        chat=3, phone="agent-ann", language="zh-CN")
    ann = await directory.authenticate("ann", PASSWORD)
    assert ann is not None and (ann.role, ann.skills, ann.chat_capacity, ann.phone) == \
        ("supervisor", "billing,tech", 3, "agent-ann")
    assert ann.password_hash.startswith("$argon2id$") and PASSWORD not in ann.password_hash
    assert await directory.authenticate("ann", PASSWORD + "!") is None
    assert await directory.authenticate("ann", "") is None
    assert await directory.authenticate("bob", PASSWORD) is None
    assert await directory.authenticate("ann\r\nrole: admin", PASSWORD) is None
    await directory.set_disabled("ann", True)
    assert await directory.authenticate("ann", PASSWORD) is None
    await directory.set_disabled("ann", False)
    await directory.set_password("ann", "another long password")
    assert await directory.authenticate("ann", PASSWORD) is None
    assert await directory.authenticate("ann", "another long password") is not None


@pytest.mark.parametrize(("field", "value", "message"), [
    ("agent_id", "a b", "agent's name"), ("agent_id", "", "agent's name"), ("agent_id", "x" * 65, "agent's name"),
    ("agent_id", "ann\r\nBcc", "agent's name"), ("password", "short", "10 to 256"),
    ("password", " " * 12, "blank"), ("password", "long enough\x00but NUL", "NUL"),
    ("role", "root", "role"), ("skills", ["billing", "tech support"], "skill"), ("phone", "PJSIP/x&y", "PJSIP"),
    ("chat", 11, "capacities"), ("voice", 2, "capacities"), ("language", "fr", "language"),
    ("display_name", "Ann\nRole: admin", "display name"),
])
async def test_a_bad_value_is_refused_with_a_reason_and_nothing_is_stored(
        store: InteractionStore, field: str, value: object, message: str) -> None:
    args: dict[str, object] = {"agent_id": "ann", "password": PASSWORD, field: value}
    with pytest.raises(AgentError, match=message):
        await AgentDirectory(store).add(**args)  # type: ignore[arg-type]
    assert await count(store) == 0


async def test_a_taken_name_is_refused(store: InteractionStore) -> None:
    directory = AgentDirectory(store)
    await directory.add("ann", PASSWORD)
    with pytest.raises(AgentError, match="already"):
        await directory.add("ann", "yet another password")
    assert await directory.authenticate("ann", PASSWORD) is not None


async def test_a_hash_with_older_parameters_is_replaced_at_the_next_login(store: InteractionStore) -> None:
    await AgentDirectory(store, PasswordHasher(time_cost=1, memory_cost=8192)).add("ann", PASSWORD)
    directory = AgentDirectory(store)
    old = (await directory.get("ann"))
    assert old is not None and directory.hasher.check_needs_rehash(old.password_hash)
    assert await directory.authenticate("ann", PASSWORD) is not None
    new = await directory.get("ann")
    assert new is not None and not directory.hasher.check_needs_rehash(new.password_hash)
    assert await directory.authenticate("ann", PASSWORD) is not None


def test_the_agents_command_adds_lists_and_disables_without_the_password_on_the_command_line(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    url = ["--set", f"database.url=sqlite+aiosqlite:///{tmp_path}/agents.db"]
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["agents", "add", "ann", "--skills", "billing,tech", "--chat", "3", "--phone", "agent-ann",
                 "--password-stdin", *url]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["agents", "add", "bob", "--password-stdin", *url]) == 1
    assert main(["agents", "disable", "ann", *url]) == 0
    assert main(["agents", "list", *url]) == 0
    out = capsys.readouterr()
    assert "10 to 256" in out.err
    rows = [line.split() for line in out.out.splitlines()]
    assert ["ann", "agent", "1", "3", "agent-ann", "disabled", "billing,", "tech"] in rows
    assert not any(row and row[0] == "bob" for row in rows)
    assert PASSWORD not in out.out and "argon2" not in out.out
