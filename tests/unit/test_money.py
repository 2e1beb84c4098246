"""Money: currency codes and their minor units."""

from __future__ import annotations

import re

import pytest

from kessai import money
from kessai.money import CURRENCY_EXPONENTS, MAX_AMOUNT, is_known_currency


@pytest.mark.parametrize(
    ("code", "exponent"),
    [("JPY", 0), ("KRW", 0), ("USD", 2), ("EUR", 2), ("KWD", 3), ("BHD", 3), ("UYW", 4)],
)
def test_minor_unit_exponents(code: str, exponent: int) -> None:
    assert is_known_currency(code)
    assert CURRENCY_EXPONENTS[code] == exponent


@pytest.mark.parametrize("code", ["XXX", "jpy", "Jpy", "", "JP", "JPYY", " JPY", "XAU", "BTC"])
def test_unknown_codes(code: str) -> None:
    assert not is_known_currency(code)
    assert code not in CURRENCY_EXPONENTS


def test_every_code_is_listed_once_with_one_exponent() -> None:
    listed = [
        (code, exponent)
        for exponent, codes in money._CODES_BY_EXPONENT.items()
        for code in codes.split()
    ]
    codes = [code for code, _ in listed]
    duplicates = sorted({code for code in codes if codes.count(code) > 1})
    assert duplicates == []
    assert dict(listed) == CURRENCY_EXPONENTS
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in codes)
    assert set(CURRENCY_EXPONENTS.values()) <= {0, 2, 3, 4}


def test_max_amount() -> None:
    assert MAX_AMOUNT == 10**12
