"""The budget check's arithmetic: what a wallet event gives from each campaign is read from its
postings, signed, so a take-back (a posting back to the campaign) counts against its grant with
no case of its own; a grant row pairs with its event by id, campaign, user and amount."""

from __future__ import annotations

from kessai.campaigns import fold_campaign
from kessai.ids import new_id
from kessai.postings import campaign_account, transfer, user_account
from reconciler.budgets import Row, Sums, _pairs, _totals_problems, campaign_flows
from tests.wallet_streams import created


def test_a_grant_gives_and_a_take_back_returns() -> None:
    grant = transfer(campaign_account("spring"), user_account("u1"), 400)
    take_back = transfer(user_account("u1"), campaign_account("spring"), 150)
    assert campaign_flows(grant) == {"spring": 400}
    assert campaign_flows(take_back) == {"spring": -150}
    assert campaign_flows([*grant, *take_back]) == {"spring": 250}
    assert campaign_flows(transfer("world:topup:bank", user_account("u1"), 900)) == {}
    assert campaign_flows(None) == {}


def test_rows_and_events_pair_by_id_and_take_backs_are_rows_like_grants() -> None:
    grant, back, lone_row, lone_event, other = (new_id() for _ in range(5))
    rows = {
        grant: Row("spring", "u1", 400, "2026-12/p1"),
        back: Row("spring", "u1", -150, "2026-12/p1/r1"),
        lone_row: Row("spring", "u2", 100, "2026-12/p2"),
        other: Row("spring", "u3", 300, "2026-12/p3"),
    }
    moved = {
        grant: [Row("spring", "u1", 400)],
        back: [Row("spring", "u1", -150)],
        lone_event: [Row("spring", "u4", 50)],
        other: [Row("spring", "u3", 299)],
    }
    found = {
        (f.details or {})["problem"]: (f.details or {}).get("event_id") for f in _pairs(rows, moved)
    }
    assert found == {
        "a grant row without its wallet event": str(lone_row),
        "a wallet event posts to the campaign without its grant row": str(lone_event),
        "a grant row and its wallet event disagree": str(other),
    }


def test_the_totals_agree_or_say_how_they_differ() -> None:

    states = {"spring": fold_campaign([created("spring", budget=1_000)])}
    assert (
        _totals_problems(
            {"spring": Sums(rows=250, grants=1, batches=250, granted_after=250)}, states
        )
        == []
    )
    problems = {
        p
        for _, p, _ in _totals_problems(
            {
                "spring": Sums(rows=1_001, grants=3, batches=1_000, granted_after=1_000),
                "gone": Sums(rows=1, grants=1, batches=1, granted_after=1),
            },
            states,
        )
    }
    assert problems == {
        "the grant rows do not add up to the total",
        "granted more than the budget",
        "grants of a campaign whose stream is missing or does not fold",
    }
