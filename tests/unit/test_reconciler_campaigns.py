"""The reconciler tells a stream's kind by its id's UUID version alone: a campaign's (8) is
never a payment's (7), a wallet's (5) or a registration's (3)."""

from __future__ import annotations

from kessai.campaigns import campaign_stream_id
from kessai.events import registration_stream_id, wallet_stream_id
from kessai.ids import new_id
from reconciler.campaigns import is_campaign_stream
from reconciler.wallets import is_registration_stream, is_wallet_stream


def test_the_stream_kinds_are_told_apart_by_the_uuid_version() -> None:
    streams = {
        "payment": new_id(),
        "wallet": wallet_stream_id("u1"),
        "registration": registration_stream_id("u1"),
        "campaign": campaign_stream_id("spring"),
        "nothing": None,
    }
    told = {
        name: (is_wallet_stream(s), is_registration_stream(s), is_campaign_stream(s))
        for name, s in streams.items()
    }
    assert told == {
        "payment": (False, False, False),
        "wallet": (True, False, False),
        "registration": (False, True, False),
        "campaign": (False, False, True),
        "nothing": (False, False, False),
    }
