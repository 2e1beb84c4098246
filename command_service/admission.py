"""Device-group admission control: under a surge, serve a rotating share of devices whole.

Cutting random requests breaks payment flows halfway (the user who got through step one fails
step two). Instead, time is cut into windows of ``window_seconds``, and a device is admitted
for a whole window when a stable hash of (device id, window number) falls in the admitted
``percent``: every request of an admitted device in that window passes, every request of the
others gets ``503 temporarily_restricted`` with ``Retry-After`` at the window's end, and the next
window admits a different group, so nobody is shut out for long.

The hash is BLAKE2b (stable across processes and restarts, unlike Python's salted ``hash()``),
so every replica makes the same decision for the same device without sharing state.

Settings come from ``KESSAI_ADMISSION_*`` and can be changed live with
``PUT /v1/admin/admission``: the live values are one row of the write store, which each
process re-reads in the background every ``RELOAD_SECONDS`` (never on the request path).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from kessai.auth import principal_of
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.schema.write import admission_settings
from kessai.settings import Settings

log = logging.getLogger(__name__)

RELOAD_SECONDS = 1.0
"""How stale a process's view of the live settings may be."""
_SCALE = 1 << 64

MESSAGE_JA = "ただいま大変混み合っています。しばらくしてから、もう一度お試しください。"
MESSAGE_EN = "We are very busy right now. Please try again in a little while."

WithoutDevice = Literal["admit", "refuse"]


class AdmissionPolicy(BaseModel):
    """What admission control does; the body of ``PUT /v1/admin/admission``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict: `false` is not a percentage, nor `"60"` (or `60.0`) a number of seconds.
    enabled: bool = Field(strict=True, description="Off: every request passes.")
    percent: float = Field(
        strict=True, ge=0, le=100, description="Share of devices admitted per window."
    )
    window_seconds: int = Field(
        strict=True, ge=10, le=86_400, description="How long a device stays admitted (or not)."
    )
    without_device: WithoutDevice = Field(
        description="Requests without X-Device-Id: `admit` them, or `refuse` them while "
        "admission control is on."
    )


def admitted(device_id: str, percent: float, window_seconds: int, now: float) -> bool:
    """Is ``device_id`` in the admitted group of the window holding ``now``?"""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    window = int(now // window_seconds)
    digest = hashlib.blake2b(f"{window}:{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < percent / 100 * _SCALE


def window_end(window_seconds: int, now: float) -> float:
    return (int(now // window_seconds) + 1) * window_seconds


@dataclass(slots=True)
class Admission:
    """One process's admission control: the policy (reloaded from the write store) and the
    allowlists (from settings)."""

    engine: Engine
    defaults: AdmissionPolicy
    allow_keys: frozenset[str]
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    _policy: AdmissionPolicy | None = None

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> Admission:
        return cls(
            engine=engine,
            defaults=AdmissionPolicy(
                enabled=settings.admission_enabled,
                percent=settings.admission_percent,
                window_seconds=settings.admission_window_seconds,
                without_device=settings.admission_without_device,
            ),
            allow_keys=frozenset(settings.admission_allow_keys),
            allow_networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.admission_allow_ips
            ),
        )

    async def policy(self) -> AdmissionPolicy:
        """The policy in force: never a query on the request path (``refresh_forever`` keeps
        it current), so a slow or locked write store does not hold requests here."""
        return self._policy or self.defaults

    async def reload(self) -> None:
        try:
            stored = await anyio.to_thread.run_sync(load_policy, self.engine)
        except sa.exc.SQLAlchemyError:
            log.warning("could not read the admission settings; keeping the last ones")
            return
        self._policy = stored or self.defaults

    async def refresh_forever(self) -> None:
        """Re-read the live policy every ``RELOAD_SECONDS`` (a task of the app's lifespan)."""
        while True:
            await self.reload()
            await anyio.sleep(RELOAD_SECONDS)

    def applied(self, policy: AdmissionPolicy) -> None:
        """This process changed the policy: apply it here at once."""
        self._policy = policy

    def bypasses(self, key_id: str, client_ip: str | None) -> bool:
        if key_id in self.allow_keys:
            return True
        if client_ip is None or not self.allow_networks:
            return False
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.allow_networks)

    async def check(self, request: Request, device_id: str | None) -> None:
        """Raise ``503 temporarily_restricted`` unless this request is admitted."""
        policy = await self.policy()
        if not policy.enabled:
            return
        client = request.client.host if request.client else None
        if self.bypasses(principal_of(request.state).key_id, client):
            return
        now = time.time()
        if device_id is None:
            if policy.without_device == "admit":
                return
        elif admitted(device_id, policy.percent, policy.window_seconds, now):
            return
        retry_after = max(1, math.ceil(window_end(policy.window_seconds, now) - now))
        raise ApiError(
            503,
            "temporarily_restricted",
            f"{MESSAGE_JA} / {MESSAGE_EN}",
            {
                "message_ja": MESSAGE_JA,
                "message_en": MESSAGE_EN,
                "retry_after_seconds": retry_after,
                "reason": "device_not_admitted" if device_id else "device_id_missing",
            },
            headers={"Retry-After": str(retry_after)},
        )


def load_policy(engine: Engine) -> AdmissionPolicy | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(admission_settings).where(admission_settings.c.setting_id == 1)
        ).first()
    if row is None:
        return None
    return AdmissionPolicy(
        enabled=bool(row.enabled),
        percent=float(row.percent),
        window_seconds=int(row.window_seconds),
        without_device=row.without_device,
    )


def store_policy(engine: Engine, policy: AdmissionPolicy, updated_by: str) -> None:
    values = {**policy.model_dump(), "updated_at": utcnow(), "updated_by": updated_by}
    table = admission_settings
    for _ in range(2):  # two first writers at once: the loser's insert collides, then updates
        try:
            with engine.begin() as conn:
                updated = conn.execute(
                    table.update().where(table.c.setting_id == 1).values(values)
                ).rowcount
                if not updated:
                    conn.execute(table.insert().values(setting_id=1, **values))
            return
        except sa.exc.IntegrityError:
            continue
    raise RuntimeError("admission settings could not be stored")  # pragma: no cover
