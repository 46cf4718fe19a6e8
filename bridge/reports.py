"""Reports over the records: deflection to self-service per intent and day.

A call counts as **deflected** when a link was sent for it (during or after the call), the customer opened the
link, and the same caller did not call again within the window (``reports.deflection_window_hours``) after the
first opening. While the window is still running the call counts as ``pending``, not as deflected.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from bridge.models import FollowUp, FollowUpState, Interaction, Link

SENT_STATES = (FollowUpState.SENT.value, FollowUpState.DELIVERED.value)


@dataclass
class DeflectionRow:
    day: dt.date
    intent: str
    calls: int = 0
    links_sent: int = 0
    opened: int = 0
    deflected: int = 0
    pending: int = 0
    called_again: int = 0
    ids: list[str] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float | None:
        """Deflected share of the calls whose link was sent and whose window has closed."""
        decided = self.links_sent - self.pending
        return self.deflected / decided if decided > 0 else None


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # SQLite hands back naive UTC


async def deflection(sessions: async_sessionmaker, since: dt.datetime, window: dt.timedelta,
                     now: dt.datetime | None = None) -> list[DeflectionRow]:
    """Rows per (day, intent) for voice interactions started since ``since``."""
    now = now or dt.datetime.now(dt.UTC)
    async with sessions() as session:
        calls = list((await session.execute(
            select(Interaction.id, Interaction.caller, Interaction.intent, Interaction.started_at)
            .where(Interaction.channel == "voice", Interaction.started_at >= since)
            .order_by(Interaction.started_at))).all())
        ids = [c.id for c in calls]
        sent: set[str] = set()
        opened: dict[str, dt.datetime] = {}
        for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
            sent.update(i for (i,) in (await session.execute(
                select(FollowUp.interaction_id).where(FollowUp.interaction_id.in_(chunk),
                                                      FollowUp.state.in_(SENT_STATES)))).all())
            for interaction_id, first in (await session.execute(
                    select(Link.interaction_id, Link.first_opened_at)
                    .where(Link.interaction_id.in_(chunk), Link.first_opened_at.is_not(None)))).all():
                first = _aware(first)
                if interaction_id not in opened or first < opened[interaction_id]:
                    opened[interaction_id] = first
        callers = sorted({c.caller for c in calls if c.id in opened and c.caller != "anonymous"})
        later: dict[str, list[dt.datetime]] = defaultdict(list)
        for chunk in (callers[i:i + 500] for i in range(0, len(callers), 500)):
            for caller, started in (await session.execute(
                    select(Interaction.caller, Interaction.started_at)
                    .where(Interaction.caller.in_(chunk), Interaction.started_at >= since))).all():
                later[caller].append(_aware(started))
    rows: dict[tuple[dt.date, str], DeflectionRow] = {}
    for call in calls:
        key = (_aware(call.started_at).date(), call.intent or "-")
        row = rows.setdefault(key, DeflectionRow(*key))
        row.calls += 1
        if call.id not in sent:
            continue
        row.links_sent += 1
        first = opened.get(call.id)
        if first is None:
            continue
        row.opened += 1
        again = any(first < t <= first + window for t in later.get(call.caller, ()))
        if again:
            row.called_again += 1
        elif now < first + window:
            row.pending += 1
        else:
            row.deflected += 1
            row.ids.append(call.id)
    return [rows[k] for k in sorted(rows)]


def format_deflection(rows: list[DeflectionRow]) -> str:
    head = f"{'day':<10}  {'intent':<16} {'calls':>6} {'links':>6} {'opened':>7} {'again':>6} {'pending':>8} " \
           f"{'deflected':>9} {'rate':>6}"
    lines = [head, "-" * len(head)]
    total = DeflectionRow(dt.date.min, "all")
    for r in rows:
        rate = f"{r.rate:.0%}" if r.rate is not None else "-"
        lines.append(f"{r.day.isoformat():<10}  {r.intent[:16]:<16} {r.calls:>6} {r.links_sent:>6} {r.opened:>7} "
                     f"{r.called_again:>6} {r.pending:>8} {r.deflected:>9} {rate:>6}")
        for name in ("calls", "links_sent", "opened", "called_again", "pending", "deflected"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
    rate = f"{total.rate:.0%}" if total.rate is not None else "-"
    lines.append("-" * len(head))
    lines.append(f"{'total':<10}  {'':<16} {total.calls:>6} {total.links_sent:>6} {total.opened:>7} "
                 f"{total.called_again:>6} {total.pending:>8} {total.deflected:>9} {rate:>6}")
    return "\n".join(lines)
