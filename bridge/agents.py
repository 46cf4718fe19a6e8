"""The people who log in to the desktop: agents, supervisors and admins, with their skills, capacities and the
phone that rings for them. Passwords are kept as argon2id hashes (argon2-cffi's defaults, re-hashed on login
when those change) and checked off the event loop: one hash costs tens of milliseconds of CPU.

Everything here reaches Redis keys and the dialplan later (skills, ``PJSIP/<phone>``), so values are allowlisted
when stored, not cleaned when used.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bridge.models import Agent, utcnow
from bridge.router import NAME_RE

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from bridge.store import InteractionStore

ROLES = ("agent", "supervisor", "admin")
LANGUAGES = ("en", "zh-CN")
PHONE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")  # a PJSIP endpoint name
MIN_PASSWORD, MAX_PASSWORD = 10, 256


class AgentError(ValueError):
    """A request the directory refuses; the message says what is wrong."""


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise AgentError(f"{what} must be 1-64 letters, digits or _.@- (got {value!r:.80})")
    return value


def check_password(password: str) -> str:
    """``password`` if it may be used; :class:`AgentError` saying why not."""
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AgentError(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if not password.strip() or any(c in password for c in "\x00\r\n"):
        raise AgentError("a password cannot be blank or hold NUL or line breaks")
    return password


class AgentDirectory:
    """Agents in the store: add, change, authenticate, list."""

    def __init__(self, store: InteractionStore, hasher: PasswordHasher | None = None) -> None:
        self.store = store
        self.hasher = hasher or PasswordHasher()
        self._dummy: str | None = None  # checked for unknown names, so they cost as much as known ones

    def _sessions(self) -> async_sessionmaker[AsyncSession]:
        if self.store.sessions is None:
            raise RuntimeError("the store is not started")
        return self.store.sessions

    async def add(self, agent_id: str, password: str, *, role: str = "agent", display_name: str = "",
                  skills: Iterable[str] = (), voice: int = 1, chat: int = 4, phone: str | None = None,
                  language: str = "en") -> Agent:
        """A new agent; :class:`AgentError` for a taken name or any value out of bounds (nothing is stored)."""
        _name(agent_id, "an agent's name")
        if role not in ROLES:
            raise AgentError(f"role must be one of {', '.join(ROLES)}")
        if len(display_name) > 128 or any(ord(c) < 32 or c in "\x7f\u2028\u2029" for c in display_name):
            raise AgentError("a display name has at most 128 characters and no control characters")
        skill_list = [_name(s, "a skill") for s in skills]
        if not 0 <= voice <= 1 or not 0 <= chat <= 10:
            raise AgentError("capacities: voice 0-1, chat 0-10")
        if phone is not None and not PHONE_RE.fullmatch(phone):
            raise AgentError("a phone is a PJSIP endpoint name: 1-40 letters, digits, _ or -")
        if language not in LANGUAGES:
            raise AgentError(f"language must be one of {', '.join(LANGUAGES)}")
        hashed = await asyncio.to_thread(self.hasher.hash, check_password(password))
        agent = Agent(id=agent_id, display_name=display_name, role=role, password_hash=hashed,
                      skills=",".join(skill_list), voice_capacity=voice, chat_capacity=chat, phone=phone,
                      language=language, disabled=False, created_at=utcnow(), password_changed_at=utcnow())
        try:
            async with self._sessions().begin() as session:
                session.add(agent)
        except IntegrityError:
            raise AgentError(f"there is already an agent called {agent_id}") from None
        return agent

    async def get(self, agent_id: str) -> Agent | None:
        async with self._sessions()() as session:
            return await session.get(Agent, agent_id)

    async def list(self) -> list[Agent]:
        async with self._sessions()() as session:
            return list((await session.execute(select(Agent).order_by(Agent.id))).scalars())

    async def set_password(self, agent_id: str, password: str) -> None:
        hashed = await asyncio.to_thread(self.hasher.hash, check_password(password))
        await self._change(agent_id, password_hash=hashed, password_changed_at=utcnow())

    async def set_disabled(self, agent_id: str, disabled: bool) -> None:
        await self._change(agent_id, disabled=disabled)

    async def _change(self, agent_id: str, **values: object) -> None:
        async with self._sessions().begin() as session:
            agent = await session.get(Agent, agent_id)
            if agent is None:
                raise AgentError(f"no agent called {agent_id!r:.80}")
            for name, value in values.items():
                setattr(agent, name, value)

    async def authenticate(self, agent_id: str, password: str) -> Agent | None:
        """The agent if the name and password match and the agent is not disabled; None otherwise, after the
        same work either way. A hash made with older parameters is replaced."""
        agent = await self.get(agent_id) if isinstance(agent_id, str) and NAME_RE.fullmatch(agent_id) else None
        if agent is None:
            if self._dummy is None:
                self._dummy = await asyncio.to_thread(self.hasher.hash, "not a password of anyone")
            stored = self._dummy
        else:
            stored = agent.password_hash
        if not isinstance(password, str) or len(password) > MAX_PASSWORD:
            return None
        try:
            await asyncio.to_thread(self.hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if agent is None or agent.disabled:
            return None
        if self.hasher.check_needs_rehash(agent.password_hash):
            await self._change(agent.id, password_hash=await asyncio.to_thread(self.hasher.hash, password))
        return agent
