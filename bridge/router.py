"""The unified queue: interactions of every channel (voice, web chat, WeChat) wait in one queue in Redis and are
offered to agents by one rule, whichever ivr-bridge process asks.

Every change is one Lua script, so it is atomic across processes sharing the Redis: an interaction is offered to
one agent at a time and no agent gets more than their capacity, however many processes assign at once.

The rule: the oldest eligible interaction (higher ``priority`` first) is offered to the most idle eligible agent
(fewest interactions in hand, then longest since their last offer). An agent is eligible when they are
``available``, have the interaction's skill and have room on its channel: ``voice`` counts against the voice
capacity (default 1), every other channel against the chat capacity (default 4, at most 10); with
``call_blocks_chats`` an agent on a call is offered no new chat (chats in progress continue).

An offer not accepted within ``offer_timeout`` goes back to the head of the queue and the agent is set ``away``.
After a call the agent is in ``wrapup`` for ``wrapup_seconds``, then ``available`` again. All of it lives in
Redis (run it with AOF), so it survives a restart of ivr-bridge and of Redis.

Each script also appends what it changed to the stream ``<prefix>log`` (kind, interaction, agent, detail, time),
in the same atomic step; :mod:`bridge.queue_log` writes that stream to the database, so the record of who waited,
who was offered what and who took it survives any process dying at any moment.

Keys share the hash tag of ``router.key_prefix`` (``{router}``), so they live in one slot of a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as aioredis

if TYPE_CHECKING:
    from bridge.config import RouterConfig
    from bridge.events import EventBus

log = logging.getLogger(__name__)

Presence = Literal["available", "away", "wrapup", "offline"]
PRESENCES: tuple[str, ...] = ("available", "away", "wrapup", "offline")
CHANNELS = ("voice", "web", "wechat")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # interaction ids, agent ids, skills
MAX_PRIORITY = 9
MODES = ("", "callback")   # how an interaction waits: someone on the line / chat (""), or for a call back

# ------------------------------------------------------------------------------------------------- Lua
# Every script takes the key prefix as ARGV[1] and the time in milliseconds as ARGV[2]. _BASE is what an assignment
# needs; the other scripts take all of _COMMON (a script pays for every function it defines, on every call).
_BASE = """
local P = ARGV[1]
local now = tonumber(ARGV[2])
local function kind(channel) if channel == 'voice' then return 'voice' end return 'chat' end
-- every change, in order, in a stream that bridge/queue_log.py writes to the database (it trims what it wrote)
local function log(what, iid, agent, detail)
  redis.call('XADD', P .. 'log', '*', 'kind', what, 'interaction', iid, 'agent', agent, 'detail', detail, 'at', now)
end
-- The agents an offer may go to now (available, room on a channel) are in three sorted sets: "rv" with room for a
-- call, "rc" for a chat, "rn" for a chat and no call in hand (what call_blocks_chats asks). A member is
-- "agent ,skills,", scored (interactions in hand) * 1e13 + idle_since: the first member with the skill is the most
-- idle eligible agent, found without reading any agent's hash.
local function index(agent, voice, chat, cap_voice, cap_chat, idle, skills, available)
  local m = agent .. ' ' .. skills
  local voice_room, chat_room = available and voice < cap_voice, available and chat < cap_chat
  local score = string.format('%d', (voice + chat) * 1e13 + idle)
  if voice_room then redis.call('ZADD', P .. 'rv', score, m) else redis.call('ZREM', P .. 'rv', m) end
  if chat_room then redis.call('ZADD', P .. 'rc', score, m) else redis.call('ZREM', P .. 'rc', m) end
  if chat_room and voice <= 0 then redis.call('ZADD', P .. 'rn', score, m) else redis.call('ZREM', P .. 'rn', m) end
end
"""
_COMMON = _BASE + """
local function refresh(agent)
  local f = redis.call('HMGET', P .. 'a:' .. agent, 'presence', 'voice', 'chat', 'cap_voice', 'cap_chat',
                       'idle_since', 'skills')
  index(agent, tonumber(f[2]) or 0, tonumber(f[3]) or 0, tonumber(f[4]) or 0, tonumber(f[5]) or 0,
        tonumber(f[6]) or 0, f[7] or ',', f[1] == 'available')
end
-- a member of the queue: "iid channel skill" (a space sorts before every character of a name, so members of
-- equal score keep the order of their ids)
local function member(iid, channel, skill) return iid .. ' ' .. channel .. ' ' .. skill end
local function release(agent, channel)
  local ak = P .. 'a:' .. agent
  if redis.call('HINCRBY', ak, kind(channel), -1) < 0 then redis.call('HSET', ak, kind(channel), 0) end
  refresh(agent)
end
-- back to the head of the queue; the agent who had it loses it (and is set away if asked)
local function requeue(iid, away, reason)
  local ik = P .. 'i:' .. iid
  local f = redis.call('HMGET', ik, 'state', 'agent', 'channel', 'score', 'skill')
  if f[1] ~= 'offered' and f[1] ~= 'active' then return false end
  local score = tonumber(f[4])
  local head = redis.call('ZRANGE', P .. 'queue', 0, 0, 'WITHSCORES')
  if head[2] and tonumber(head[2]) <= score then score = tonumber(head[2]) - 1 end
  redis.call('HSET', ik, 'state', 'queued', 'score', score)
  redis.call('HDEL', ik, 'agent', 'deadline', 'offered_at', 'accepted_at', 'dialing')
  redis.call('ZADD', P .. 'queue', score, member(iid, f[3], f[5]))
  redis.call('ZREM', P .. 'deadlines', 'o:' .. iid)
  log('requeued', iid, f[2], reason)
  local ak = P .. 'a:' .. f[2]
  if away and redis.call('HGET', ak, 'presence') == 'available' then
    redis.call('HSET', ak, 'presence', 'away')
    log('presence', '', f[2], 'away')
  end
  release(f[2], f[3])
  return f[2]
end
"""

# ARGV: prefix, now, iid, channel, skill, priority. 1: queued; 0: already known (nothing changes).
_ENQUEUE = _COMMON + """
local ik = P .. 'i:' .. ARGV[3]
if redis.call('EXISTS', ik) == 1 then return 0 end
local score = now - tonumber(ARGV[6]) * 1e12
redis.call('HSET', ik, 'channel', ARGV[4], 'skill', ARGV[5], 'priority', ARGV[6], 'score', score,
           'state', 'queued', 'queued_at', now, 'offers', 0)
redis.call('ZADD', P .. 'queue', score, member(ARGV[3], ARGV[4], ARGV[5]))
redis.call('SADD', P .. 'live', ARGV[3])
log('joined', ARGV[3], '', ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[6])
return 1
"""

# ARGV: prefix, now, offer timeout ms, scan limit, call blocks chats (1/0), most offers.
# Returns iid, agent, channel, offer number, ... for each offer made.
# The queue is read from its head in growing chunks (the interaction offered is usually among the first few); the
# agents with room come from the sorted sets kept by index(), most idle first; a channel and skill found with nobody
# eligible is not looked for again in this call (an offer only ever takes room away).
_ASSIGN = _BASE + """
local timeout = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local blocks = ARGV[5] == '1'
local most = tonumber(ARGV[6])
local out = {}
local chats = P .. (blocks and 'rn' or 'rc')
local voices, texts = redis.call('ZRANGE', P .. 'rv', 0, -1), redis.call('ZRANGE', chats, 0, -1)
if #voices == 0 and #texts == 0 then return out end
local nobody = {}     -- "channel skill" -> true: nobody eligible
local seen, taken, chunk = 0, 0, 8
while seen < limit do
  local upto = math.min(seen + chunk, limit)
  local members = redis.call('ZRANGE', P .. 'queue', seen - taken, upto - taken - 1)
  for _, m in ipairs(members) do
    local sp = string.find(m, ' ', 1, true)
    local what = string.sub(m, sp + 1)
    if not nobody[what] then
      local sp2 = string.find(what, ' ', 1, true)
      local channel, skill = string.sub(what, 1, sp2 - 1), string.sub(what, sp2 + 1)
      local voice = channel == 'voice'
      local want = ',' .. skill .. ','
      local best
      for _, c in ipairs(voice and voices or texts) do
        if string.find(c, want, 1, true) then best = string.sub(c, 1, string.find(c, ' ', 1, true) - 1); break end
      end
      if best then
        local iid = string.sub(m, 1, sp - 1)
        local ik, ak = P .. 'i:' .. iid, P .. 'a:' .. best
        local n = redis.call('HINCRBY', ik, 'offers', 1)
        redis.call('HSET', ik, 'state', 'offered', 'agent', best, 'offered_at', now, 'deadline', now + timeout)
        redis.call('ZREM', P .. 'queue', m)
        taken = taken + 1
        redis.call('ZADD', P .. 'deadlines', now + timeout, 'o:' .. iid)
        local a = redis.call('HMGET', ak, 'presence', 'voice', 'chat', 'cap_voice', 'cap_chat', 'skills')
        local held_voice, held_chat = tonumber(a[2]) or 0, tonumber(a[3]) or 0
        if voice then held_voice = held_voice + 1 else held_chat = held_chat + 1 end
        redis.call('HSET', ak, kind(channel), voice and held_voice or held_chat, 'idle_since', now)
        index(best, held_voice, held_chat, tonumber(a[4]) or 0, tonumber(a[5]) or 0, now, a[6] or ',',
              a[1] == 'available')
        log('offered', iid, best, tostring(n))
        out[#out + 1] = iid
        out[#out + 1] = best
        out[#out + 1] = channel
        out[#out + 1] = n
        if #out >= most * 4 then return out end
        voices, texts = redis.call('ZRANGE', P .. 'rv', 0, -1), redis.call('ZRANGE', chats, 0, -1)
        if #voices == 0 and #texts == 0 then return out end
      else
        nobody[what] = true
      end
    end
  end
  if #members < upto - seen then break end   -- the end of the queue
  seen = upto
  chunk = chunk * 2
end
return out
"""

# ARGV: prefix, now, iid, agent. 1: accepted; 0: not offered to this agent (expired, taken back).
_ACCEPT = _COMMON + """
local ik = P .. 'i:' .. ARGV[3]
local f = redis.call('HMGET', ik, 'state', 'agent')
if f[1] ~= 'offered' or f[2] ~= ARGV[4] then return 0 end
redis.call('HSET', ik, 'state', 'active', 'accepted_at', now)
redis.call('HDEL', ik, 'deadline')
redis.call('ZREM', P .. 'deadlines', 'o:' .. ARGV[3])
log('accepted', ARGV[3], ARGV[4], '')
-- the time between accepts per skill, as a moving average (what one place in the queue costs a caller; gaps
-- longer than 15 minutes, e.g. overnight, say nothing about the pace and are left out)
local skill = redis.call('HGET', ik, 'skill') or ''
local pace = P .. 'pace'
local last = tonumber(redis.call('HGET', pace, skill .. ':last'))
redis.call('HSET', pace, skill .. ':last', now)
if last and now - last < 900000 then
  local avg = tonumber(redis.call('HGET', pace, skill))
  local gap = now - last
  redis.call('HSET', pace, skill, string.format('%d', avg and (avg * 0.8 + gap * 0.2) or gap))
end
return 1
"""

# ARGV: prefix, now, iid, agent, skill. 1: back at the head of the queue under the new skill; 0: not active with
# this agent.
_TRANSFER = _COMMON + """
local ik = P .. 'i:' .. ARGV[3]
local f = redis.call('HMGET', ik, 'state', 'agent', 'channel', 'score', 'skill')
if f[1] ~= 'active' or f[2] ~= ARGV[4] then return 0 end
redis.call('HSET', ik, 'skill', ARGV[5])
requeue(ARGV[3], false, 'transfer to ' .. ARGV[5])
return 1
"""

# ARGV: prefix, now, iid, channel, mode. The interaction goes on waiting on another channel (a caller who took
# the chat link and hung up) or in another mode ('callback': nobody on the line, Asterisk calls back), keeping
# its place. An offer in progress is taken back (it was for the old channel). 1: done; 0: unknown or active.
_SWITCH = _COMMON + """
local iid = ARGV[3]
local ik = P .. 'i:' .. iid
local f = redis.call('HMGET', ik, 'state', 'channel', 'skill', 'score', 'agent')
if not f[1] or f[1] == 'active' then return 0 end
if f[1] == 'offered' then
  redis.call('HSET', ik, 'state', 'queued')
  redis.call('HDEL', ik, 'agent', 'deadline', 'offered_at')
  redis.call('ZREM', P .. 'deadlines', 'o:' .. iid)
  log('requeued', iid, f[5], 'switched to ' .. ARGV[4])
  release(f[5], f[2])
else
  redis.call('ZREM', P .. 'queue', member(iid, f[2], f[3]))
end
redis.call('HSET', ik, 'channel', ARGV[4], 'mode', ARGV[5])
redis.call('ZADD', P .. 'queue', f[4], member(iid, ARGV[4], f[3]))
if ARGV[5] == 'callback' then redis.call('SADD', P .. 'callbacks', iid)
else redis.call('SREM', P .. 'callbacks', iid) end
log('switched', iid, '', ARGV[4] .. ' ' .. ARGV[5])
return 1
"""

# ARGV: prefix, now. Callbacks an agent has accepted and nobody dials yet, claimed for the caller of this script
# (so one process dials each): iid, agent, ...
_CALLBACKS = _COMMON + """
local out = {}
for _, iid in ipairs(redis.call('SMEMBERS', P .. 'callbacks')) do
  local ik = P .. 'i:' .. iid
  local f = redis.call('HMGET', ik, 'state', 'agent', 'dialing')
  if f[1] == 'active' and not f[3] then
    redis.call('HSET', ik, 'dialing', now)
    out[#out + 1] = iid
    out[#out + 1] = f[2]
  end
end
return out
"""

# ARGV: prefix, now, iid. Place in the queue (1 = next; 0 = not waiting), the agents who could take it (logged
# in with the skill, not offline) and the average time between accepts of its skill in ms (0 = not known yet).
_POSITION = _COMMON + """
local ik = P .. 'i:' .. ARGV[3]
local f = redis.call('HMGET', ik, 'state', 'channel', 'skill')
if f[1] ~= 'queued' then return {0, 0, 0} end
local rank = redis.call('ZRANK', P .. 'queue', member(ARGV[3], f[2], f[3]))
local want, staffed = ',' .. f[3] .. ',', 0
for _, a in ipairs(redis.call('SMEMBERS', P .. 'agents')) do
  local g = redis.call('HMGET', P .. 'a:' .. a, 'skills', 'presence')
  if g[1] and string.find(g[1], want, 1, true) and g[2] ~= 'offline' then staffed = staffed + 1 end
end
return {rank and rank + 1 or 0, staffed, tonumber(redis.call('HGET', P .. 'pace', f[3])) or 0}
"""

# ARGV: prefix, now, iid, agent ('' = whoever has it), away (1/0), reason. 1: back in the queue; 0: not theirs.
_REQUEUE = _COMMON + """
local f = redis.call('HMGET', P .. 'i:' .. ARGV[3], 'agent')
if ARGV[4] ~= '' and f[1] ~= ARGV[4] then return 0 end
if requeue(ARGV[3], ARGV[5] == '1', ARGV[6]) then return 1 end
return 0
"""

# ARGV: prefix, now, iid, wrap-up ms. Returns the state it ended from ('' if unknown) and the agent ('' if none).
_FINISH = _COMMON + """
local ik = P .. 'i:' .. ARGV[3]
local f = redis.call('HMGET', ik, 'state', 'agent', 'channel', 'skill')
if not f[1] then return {'', ''} end
redis.call('DEL', ik)
redis.call('SREM', P .. 'live', ARGV[3])
redis.call('SREM', P .. 'callbacks', ARGV[3])
log('left', ARGV[3], f[2] or '', f[1])
if f[1] == 'queued' then
  redis.call('ZREM', P .. 'queue', member(ARGV[3], f[3], f[4]))
  return {'queued', ''}
end
redis.call('ZREM', P .. 'deadlines', 'o:' .. ARGV[3])
release(f[2], f[3])
local wrapup = tonumber(ARGV[4])
local ak = P .. 'a:' .. f[2]
if f[1] == 'active' and f[3] == 'voice' and wrapup > 0 and redis.call('HGET', ak, 'presence') == 'available' then
  redis.call('HSET', ak, 'presence', 'wrapup', 'wrapup_until', now + wrapup)
  redis.call('ZADD', P .. 'deadlines', now + wrapup, 'w:' .. f[2])
  refresh(f[2])
  log('presence', '', f[2], 'wrapup')
end
return {f[1], f[2]}
"""

# ARGV: prefix, now, agent, skills (",a,b,"), voice capacity, chat capacity.
_LOGIN = _COMMON + """
local ak = P .. 'a:' .. ARGV[3]
local old = redis.call('HGET', ak, 'skills')
if old then index(ARGV[3], 0, 0, 0, 0, 0, old, false) end   -- out of the sets under the skills it had
redis.call('HSET', ak, 'skills', ARGV[4], 'cap_voice', ARGV[5], 'cap_chat', ARGV[6])
if redis.call('HSETNX', ak, 'presence', 'away') == 1 or redis.call('HGET', ak, 'presence') == 'offline' then
  redis.call('HSET', ak, 'presence', 'away', 'voice', 0, 'chat', 0, 'idle_since', now)
end
redis.call('SADD', P .. 'agents', ARGV[3])
refresh(ARGV[3])
log('login', '', ARGV[3], ARGV[4])
return 1
"""

# ARGV: prefix, now, agent, presence. 1: set; 0: unknown agent; -1: offline refused (interactions in hand).
_PRESENCE = _COMMON + """
local ak = P .. 'a:' .. ARGV[3]
if redis.call('SISMEMBER', P .. 'agents', ARGV[3]) == 0 then return 0 end
local presence = ARGV[4]
if presence == 'offline' then
  local f = redis.call('HMGET', ak, 'voice', 'chat')
  if (tonumber(f[1]) or 0) + (tonumber(f[2]) or 0) > 0 then return -1 end
  redis.call('SREM', P .. 'agents', ARGV[3])
end
redis.call('HSET', ak, 'presence', presence)
redis.call('HDEL', ak, 'wrapup_until')
redis.call('ZREM', P .. 'deadlines', 'w:' .. ARGV[3])
if presence == 'available' then redis.call('HSET', ak, 'idle_since', now) end
refresh(ARGV[3])
log('presence', '', ARGV[3], presence)
return 1
"""

# ARGV: prefix, now. Offers past their deadline go back (agent away); wrap-ups past theirs end.
# Returns kind, id, agent, ... ('expired', iid, agent / 'wrapped', agent, agent).
_TICK = _COMMON + """
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'deadlines', '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', P .. 'deadlines', m)
  local what, id = string.sub(m, 1, 1), string.sub(m, 3)
  if what == 'o' then
    local agent = requeue(id, true, 'offer timed out')
    if agent then out[#out + 1] = 'expired'; out[#out + 1] = id; out[#out + 1] = agent end
  else
    local ak = P .. 'a:' .. id
    if redis.call('HGET', ak, 'presence') == 'wrapup' then
      redis.call('HSET', ak, 'presence', 'available', 'idle_since', now)
      redis.call('HDEL', ak, 'wrapup_until')
      refresh(id)
      log('presence', '', id, 'available')
      out[#out + 1] = 'wrapped'; out[#out + 1] = id; out[#out + 1] = id
    end
  end
end
return out
"""

# ARGV: prefix, now. Everything at one instant: the queue's ids in order, every interaction the router holds and
# every agent logged in (with their fields as flat name/value lists).
_SNAPSHOT = _COMMON + """
local queue = {}
for i, m in ipairs(redis.call('ZRANGE', P .. 'queue', 0, -1)) do queue[i] = string.match(m, '^[^ ]+') end
local items = {}
for _, iid in ipairs(redis.call('SMEMBERS', P .. 'live')) do
  items[#items + 1] = {iid, redis.call('HGETALL', P .. 'i:' .. iid)}
end
local agents = {}
for _, a in ipairs(redis.call('SMEMBERS', P .. 'agents')) do
  agents[#agents + 1] = {a, redis.call('HGETALL', P .. 'a:' .. a)}
end
local ready = {}
for _, key in ipairs({'rv', 'rc'}) do
  for _, m in ipairs(redis.call('ZRANGE', P .. key, 0, -1)) do ready[#ready + 1] = string.match(m, '^[^ ]+') end
end
return {queue, items, agents, ready}
"""


# ------------------------------------------------------------------------------------------------- Python
class RouterError(ValueError):
    """A request the router refuses (bad id, unknown channel, skill or presence)."""


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RouterError(f"{what} must be 1-64 letters, digits or _.@- (got {value!r:.80})")
    return value


@dataclass(frozen=True)
class Offer:
    """An interaction offered to an agent; ``number`` counts the offers made for it (1 = first)."""

    interaction: str
    agent: str
    channel: str
    number: int
    deadline: float  # Unix time


@dataclass(frozen=True)
class Position:
    """A waiting interaction's place (1 = next, 0 = not waiting), the agents logged in with its skill, and
    the expected wait in seconds (place x the recent time between accepts of the skill; None until known)."""

    place: int
    staffed: int
    expected_wait: float | None


@dataclass
class AgentState:
    agent: str
    presence: str
    skills: list[str]
    voice: int
    chat: int
    cap_voice: int
    cap_chat: int
    idle_since: float
    wrapup_until: float | None = None


@dataclass
class InteractionState:
    interaction: str
    channel: str
    skill: str
    priority: int
    state: str          # queued, offered, active
    queued_at: float    # Unix time
    agent: str | None = None
    offers: int = 0
    mode: str = ""      # "callback": nobody on the line; Asterisk calls the customer back


@dataclass
class Snapshot:
    """The whole live state at one instant (the supervisor view; the invariant checks of the tests)."""

    taken_at: float
    queue: list[str] = field(default_factory=list)   # ids of the waiting interactions, head first
    interactions: dict[str, InteractionState] = field(default_factory=dict)
    agents: dict[str, AgentState] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)      # agents an offer may go to now

    def per_skill(self) -> dict[str, dict[str, float]]:
        """Per skill: interactions waiting and the longest wait in seconds."""
        out: dict[str, dict[str, float]] = {}
        for iid in self.queue:
            item = self.interactions[iid]
            entry = out.setdefault(item.skill, {"waiting": 0, "longest_wait": 0.0})
            entry["waiting"] += 1
            entry["longest_wait"] = max(entry["longest_wait"], self.taken_at - item.queued_at)
        return out


Listener = Callable[[str, dict[str, Any]], None]


async def wait_or_cancel(task: asyncio.Task[None], timeout: float) -> None:
    """Wait for a task that was asked to stop; cancel it only if it has not ended within ``timeout``."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Router:
    """Queue, offers, presence and capacities in Redis; ``start()`` runs the loop that makes offers and expires
    them (every process may run one: the scripts keep them from getting in each other's way)."""

    def __init__(self, redis_url: str, config: RouterConfig, bus: EventBus | None = None,
                 redis: aioredis.Redis | None = None) -> None:
        self.config = config
        self.bus = bus
        self._redis = redis or aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._own_redis = redis is None
        self._prefix = config.key_prefix
        self._scripts = {name: self._redis.register_script(body) for name, body in (
            ("enqueue", _ENQUEUE), ("assign", _ASSIGN), ("accept", _ACCEPT), ("requeue", _REQUEUE),
            ("finish", _FINISH), ("login", _LOGIN), ("presence", _PRESENCE), ("tick", _TICK),
            ("snapshot", _SNAPSHOT), ("transfer", _TRANSFER), ("switch", _SWITCH), ("position", _POSITION),
            ("callbacks", _CALLBACKS))}
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self._redis.ping()
        self._task = asyncio.create_task(self._run(), name="router")

    async def aclose(self) -> None:
        if self._task is not None:
            # Asked to stop rather than cancelled: on Python 3.11 asyncio.wait_for (inside redis-py's commands)
            # can swallow a cancellation (CPython gh-86296), and the loop would go on. Cancelled only if stuck.
            self._stopping = True
            self._wake.set()
            await wait_or_cancel(self._task, 5)
            self._task = None
        if self._own_redis:
            await self._redis.aclose()

    def add_listener(self, listener: Listener) -> None:
        """``listener(kind, fields)`` for every router event in this process (offers, expiries, wrap-ups)."""
        self._listeners.append(listener)

    def wake(self) -> None:
        """Something changed (an interaction queued, an agent free): assign now, not at the next tick."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
                while not self._stopping and await self.assign():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: try again at the next tick
                log.exception("router: cannot reach Redis; retrying")
            if self._stopping:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.tick_interval)

    def _emit(self, kind: str, **fields: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, fields)
            except Exception:
                log.exception("router: listener failed on %s", kind)
        if self.bus is not None:
            self.bus.publish(kind, **fields)

    async def _call(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](args=[self._prefix, int(time.time() * 1000), *args])

    # ---------------------------------------------------------------------------------------- interactions
    async def enqueue(self, interaction: str, channel: str, skill: str, priority: int = 0) -> bool:
        """Put an interaction in the queue; False if the router already has it (a repeated request)."""
        _name(interaction, "interaction id")
        _name(skill, "skill")
        if channel not in CHANNELS:
            raise RouterError(f"unknown channel {channel!r}; one of {', '.join(CHANNELS)}")
        if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise RouterError(f"priority must be 0-{MAX_PRIORITY}")
        queued = bool(await self._call("enqueue", interaction, channel, skill, priority))
        if queued:
            log.info("queue: %s (%s, skill %s, priority %d) queued", interaction, channel, skill, priority)
            self._emit("queue-joined", interaction=interaction, channel=channel, skill=skill)
            self.wake()
        return queued

    async def assign(self, most: int = 32) -> list[Offer]:
        """Make the offers the rule allows now (at most ``most``); every process may call it at any time."""
        cfg = self.config
        flat = await self._call("assign", int(cfg.offer_timeout * 1000), cfg.scan_limit,
                                1 if cfg.call_blocks_chats else 0, most)
        deadline = time.time() + cfg.offer_timeout
        offers = [Offer(flat[i], flat[i + 1], flat[i + 2], int(flat[i + 3]), deadline)
                  for i in range(0, len(flat), 4)]
        for offer in offers:
            log.info("queue: %s offered to %s (offer %d)", offer.interaction, offer.agent, offer.number)
            self._emit("queue-offer", interaction=offer.interaction, agent=offer.agent, channel=offer.channel,
                       number=offer.number, deadline=offer.deadline)
        return offers

    async def accept(self, interaction: str, agent: str) -> bool:
        """The agent takes the offer; False if it is no longer theirs (expired, taken back)."""
        accepted = bool(await self._call("accept", _name(interaction, "interaction id"), _name(agent, "agent id")))
        if accepted:
            self._emit("queue-accepted", interaction=interaction, agent=agent)
        return accepted

    async def requeue(self, interaction: str, agent: str | None = None, *, away: bool = False,
                      reason: str = "declined") -> bool:
        """Back to the head of the queue (declined, the agent's phone did not answer); ``away`` sets the agent
        away. With ``agent``, only if that agent has it."""
        _name(interaction, "interaction id")
        done = bool(await self._call("requeue", interaction, _name(agent, "agent id") if agent else "",
                                     1 if away else 0, reason[:64]))
        if done:
            log.info("queue: %s back at the head (%s)", interaction, reason)
            self._emit("queue-requeued", interaction=interaction, agent=agent, reason=reason)
            self.wake()
        return done

    async def finish(self, interaction: str) -> tuple[str, str | None]:
        """The interaction ended (hang-up, chat closed); returns the state it ended from (``queued`` means
        abandoned while waiting, "" unknown) and the agent who had it. After an active call the agent wraps up."""
        state, agent = await self._call("finish", _name(interaction, "interaction id"),
                                        int(self.config.wrapup_seconds * 1000))
        if state:
            self._emit("queue-left", interaction=interaction, state=state, agent=agent or None)
            self.wake()
        return state, agent or None

    async def transfer(self, interaction: str, agent: str, skill: str) -> bool:
        """The agent hands an active interaction to another skill: back to the head of the queue under that
        skill, the agent's room freed (no wrap-up). False if it is not active with this agent."""
        done = bool(await self._call("transfer", _name(interaction, "interaction id"), _name(agent, "agent id"),
                                     _name(skill, "skill")))
        if done:
            log.info("queue: %s transferred by %s to %s", interaction, agent, skill)
            self._emit("queue-requeued", interaction=interaction, agent=agent, reason=f"transfer to {skill}")
            self.wake()
        return done

    async def switch(self, interaction: str, channel: str, mode: str = "") -> bool:
        """Go on waiting on another channel or in another ``mode`` ("callback": Asterisk calls the customer
        back when an agent takes it), keeping the place in the queue. False when unknown or already active."""
        _name(interaction, "interaction id")
        if channel not in CHANNELS:
            raise RouterError(f"unknown channel {channel!r}; one of {', '.join(CHANNELS)}")
        if mode not in MODES:
            raise RouterError(f"unknown mode {mode!r}; one of {', '.join(repr(m) for m in MODES)}")
        done = bool(await self._call("switch", interaction, channel, mode))
        if done:
            log.info("queue: %s now waits as %s%s, keeping its place", interaction, channel,
                     f" ({mode})" if mode else "")
            self._emit("queue-switched", interaction=interaction, channel=channel, mode=mode)
            self.wake()
        return done

    async def position(self, interaction: str) -> Position:
        """Where a waiting interaction stands: its place, who could take it, and the expected wait."""
        place, staffed, pace_ms = await self._call("position", _name(interaction, "interaction id"))
        pace = int(pace_ms) / 1000
        return Position(int(place), int(staffed), place * pace if place and pace else None)

    async def callbacks_due(self) -> list[tuple[str, str]]:
        """Callbacks an agent has accepted that nobody dials yet, as (interaction, agent); each is handed to
        one caller of this method only (a failed call back goes through ``requeue``, which frees it again)."""
        flat = await self._call("callbacks")
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    # ---------------------------------------------------------------------------------------- agents
    async def login(self, agent: str, skills: Iterable[str], *, voice: int | None = None,
                    chat: int | None = None) -> None:
        """Register an agent (``away`` until they say otherwise) with skills and capacities (the configured
        defaults when not given; chat at most 10)."""
        skills = [_name(s, "skill") for s in skills]
        cap_voice = self.config.voice_capacity if voice is None else voice
        cap_chat = self.config.chat_capacity if chat is None else chat
        if not 0 <= cap_voice <= 1 or not 0 <= cap_chat <= 10:
            raise RouterError("capacities: voice 0-1, chat 0-10")
        await self._call("login", _name(agent, "agent id"), "," + ",".join(skills) + ",", cap_voice, cap_chat)

    async def set_presence(self, agent: str, presence: str) -> bool:
        """``available``, ``away`` or ``offline`` (refused while the agent has interactions in hand)."""
        if presence not in ("available", "away", "offline"):
            raise RouterError(f"presence must be available, away or offline (got {presence!r:.40})")
        result = int(await self._call("presence", _name(agent, "agent id"), presence))
        if result == -1:
            raise RouterError(f"agent {agent} still has interactions in hand")
        if result == 1:
            self._emit("agent-presence", agent=agent, presence=presence)
            if presence == "available":
                self.wake()
        return result == 1

    async def tick(self) -> None:
        """Expire offers and wrap-ups that are due (the loop does this every ``tick_interval``)."""
        flat = await self._call("tick")
        for i in range(0, len(flat), 3):
            kind, what, agent = flat[i:i + 3]
            if kind == "expired":
                log.info("queue: offer of %s to %s not accepted in time; back at the head, %s away",
                         what, agent, agent)
                self._emit("queue-requeued", interaction=what, agent=agent, reason="offer timed out")
                self._emit("agent-presence", agent=agent, presence="away")
            else:
                self._emit("agent-presence", agent=agent, presence="available")
            self.wake()

    async def snapshot(self) -> Snapshot:
        """Queue and agents read at one instant."""
        queue, items, agents, ready = await self._call("snapshot")
        snap = Snapshot(time.time(), list(queue), ready=set(ready))
        for iid, pairs in items:
            f = dict(zip(pairs[::2], pairs[1::2], strict=True))
            snap.interactions[iid] = InteractionState(
                iid, f.get("channel", ""), f.get("skill", ""), int(f.get("priority", 0)), f.get("state", ""),
                float(f.get("queued_at", 0)) / 1000, f.get("agent"), int(f.get("offers", 0)), f.get("mode", ""))
        for agent, pairs in agents:
            f = dict(zip(pairs[::2], pairs[1::2], strict=True))
            snap.agents[agent] = AgentState(
                agent, f.get("presence", "offline"), [s for s in f.get("skills", "").split(",") if s],
                int(f.get("voice", 0)), int(f.get("chat", 0)), int(f.get("cap_voice", 0)),
                int(f.get("cap_chat", 0)), float(f.get("idle_since", 0)) / 1000,
                float(f["wrapup_until"]) / 1000 if f.get("wrapup_until") else None)
        return snap

    async def interaction(self, interaction: str) -> dict[str, str]:
        """The router's record of one interaction (empty when it has none)."""
        key = self._prefix + "i:" + _name(interaction, "interaction id")
        return {str(k): str(v) for k, v in (await self._redis.hgetall(key)).items()}
