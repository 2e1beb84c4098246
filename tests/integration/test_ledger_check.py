"""The suite's own ledger check (tests/ledger_check.py, run when every test's write store goes)
finds postings that do not say what their event says, and lets right ones through."""

from __future__ import annotations

from pathlib import Path

from command_service import handlers
from kessai.db import create_db_engine
from kessai.postings import Posting, capture_postings, refund_postings
from migrations import upgrade
from tests.ledger_check import ledger_problems
from tests.unit.test_postings import captured, refunded
from tests.unit.test_wallet_events import credited, debited, topped_up


def store(tmp_path: Path, *stored: handlers.Event) -> str:
    """A write store holding ``stored``, appended as the command API appends (its own SQL)."""
    url = f"sqlite:///{tmp_path / 'write.db'}"
    upgrade("write", url)
    engine = create_db_engine(url, pool_size=1)
    with engine.begin() as conn:
        handlers.append_events(conn, list(stored), shards=1)
    engine.dispose()
    return url


def test_right_postings_and_postings_derived_from_old_events_pass(tmp_path: Path) -> None:
    url = store(
        tmp_path,
        topped_up(1_500, 1_500),
        captured("balance", postings=capture_postings("balance", "u1", "shop-1", 1_000)),
        debited(1_000, 500, version=2),
        refunded(200, 200, postings=refund_postings("balance", "u1", "shop-1", 200)),
        credited(200, 700, version=3),
        refunded(300, 500, version=3),  # stored before postings existed: derived
    )
    assert ledger_problems(url) == []


def test_a_balance_payment_whose_wallet_was_not_debited_is_found(tmp_path: Path) -> None:
    url = store(
        tmp_path,
        topped_up(1_500, 1_500),
        captured("balance", postings=capture_postings("balance", "u1", "shop-1", 1_000)),
    )
    (problem,) = ledger_problems(url)
    assert problem == "wallet u1 holds 1500; its postings add up to 500"


def test_a_wallet_chain_that_does_not_add_up_is_found(tmp_path: Path) -> None:
    url = store(
        tmp_path,
        topped_up(1_500, 1_500),
        captured("balance", postings=capture_postings("balance", "u1", "shop-1", 1_000)),
        debited(1_000, 600, version=2),  # 1,500 - 1,000 is 500
    )
    assert ledger_problems(url)[0] == "wallet u1: 1500 -1000 is not 600"


def test_balanced_postings_that_move_the_wrong_money_are_found(tmp_path: Path) -> None:
    # Balanced, but a balance payment must come out of the user's wallet, not the acquirer.
    wrong = capture_postings("card", "u1", "shop-1", 1_000)
    url = store(tmp_path, captured("balance", postings=wrong))
    (problem,) = ledger_problems(url)
    assert "its payload says" in problem
    assert "user:u1" in problem


def test_a_refund_posted_to_another_merchant_is_found(tmp_path: Path) -> None:
    url = store(
        tmp_path,
        captured("card"),
        refunded(
            200,
            200,
            postings=(
                Posting(account="merchant:shop-2", amount=-200),
                Posting(account="world:acquirer", amount=200),
            ),
        ),
    )
    (problem,) = ledger_problems(url)
    assert "merchant:shop-2" in problem
