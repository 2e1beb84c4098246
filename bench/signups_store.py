"""What ``bench.signups`` writes to and reads from the write store: its two campaigns, how far
the rewards service has got, and the welcome bonuses of the storm's users (their lag and the
check that each got exactly its 500 yen)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.campaigns import decide_create, parse_rules
from kessai.clock import utcnow
from kessai.schema.write import events, reward_grants, user_registrations, wallet_events
from kessai.write_store import append_events

WELCOME = "bench-welcome"
CASHBACK = "bench-cashback"
BONUS = 500
"""The welcome bonus (yen) every user of the storm must get, exactly once."""


def create_campaigns(engine: Engine, registrations: int) -> None:
    """A welcome bonus with room for twice the storm's users, and 20% cashback on every
    payment (at most 1,000 yen each) with a budget no run spends: the rewards service has a
    grant to write for every payment and every registration."""
    now = utcnow()
    window = {
        "currency": "JPY",
        "starts_at": (now - timedelta(days=1)).isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
    }
    welcome = {
        "campaign_id": WELCOME,
        "name": "500 yen on sign-up",
        "kind": "welcome_bonus",
        "budget": BONUS * registrations * 2,
        **window,
    }
    cashback = {
        "campaign_id": CASHBACK,
        "name": "20% back",
        "kind": "cashback",
        "budget": 10**11,
        "rate_bp": 2000,
        "cap_per_payment": 1_000,
        "cap_per_user_month": 10**11,
        **window,
    }
    created = [decide_create(parse_rules(r), now=now, actor="bench") for r in (welcome, cashback)]
    with engine.begin() as conn:
        append_events(conn, created, shards=8)


def grants_of(engine: Engine, campaign_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(reward_grants)
                .where(reward_grants.c.campaign_id == campaign_id)
            ).scalar_one()
        )


def captured(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(events)
                .where(events.c.event_type == "PaymentCaptured")
            ).scalar_one()
        )


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.25)
    return time.monotonic() - started


def caught_up(engine: Engine, registered: int, timeout: float = 600.0) -> dict[str, Any]:
    """Wait until the rewards service granted every registered user and every captured
    payment; how long each took from now (None: not within ``timeout``)."""
    welcome = wait_for(lambda: grants_of(engine, WELCOME) >= registered, timeout)
    cashback = wait_for(lambda: grants_of(engine, CASHBACK) >= captured(engine), timeout)
    return {
        "welcome_seconds": None if welcome is None else round(welcome, 2),
        "cashback_seconds": None if cashback is None else round(cashback, 2),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank, as the load generator's figures are."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def welcome_figures(engine: Engine, users: Sequence[str]) -> dict[str, Any]:
    """The storm's users' welcome bonuses, read from the write store: the grant lag (the
    grant's ``recorded_at`` minus the registration's) and whether every user holds exactly one
    grant of exactly ``BONUS`` (its ``reward_grants`` row and its one ``RewardGranted``)."""
    g, r, w = reward_grants.c, user_registrations.c, wallet_events.c
    wanted = set(users)
    with engine.connect() as conn:
        lags = [
            (granted - registered).total_seconds()
            for user_id, registered, granted in conn.execute(
                sa.select(r.user_id, r.recorded_at, g.recorded_at).join(
                    reward_grants,
                    sa.and_(g.user_id == r.user_id, g.campaign_id == WELCOME),
                )
            )
            if user_id in wanted
        ]
        amounts: Counter[str] = Counter()
        rows: Counter[str] = Counter()
        for user_id, amount in conn.execute(
            sa.select(g.user_id, g.amount).where(g.campaign_id == WELCOME)
        ):
            amounts[user_id] += int(amount)
            rows[user_id] += 1
        movements = Counter(
            user_id
            for (user_id,) in conn.execute(
                sa.select(w.user_id).where(w.event_type == "RewardGranted")
            )
            if user_id in wanted
        )
    exact = {u for u in users if amounts[u] == BONUS and rows[u] == 1 and movements[u] == 1}
    p50, p99 = percentile(lags, 0.50), percentile(lags, 0.99)
    return {
        "users": len(users),
        "granted": sum(1 for u in users if rows[u]),
        "granted_exactly_500": len(exact),
        "every_user_exactly_500": len(exact) == len(users),
        "not_granted": sum(1 for u in users if not rows[u]),
        "granted_otherwise": sum(1 for u in users if rows[u] and u not in exact),
        "grant_lag_ms": {
            "p50": None if p50 is None else round(p50 * 1000, 1),
            "p99": None if p99 is None else round(p99 * 1000, 1),
            "max": round(max(lags) * 1000, 1) if lags else None,
        },
    }
